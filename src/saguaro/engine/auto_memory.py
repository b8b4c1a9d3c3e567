"""What `MeasuredRounds` measured, remembered across processes on the same machine and setup.

A fresh process otherwise spends its first rounds timing both modes, and on a machine where SSD loses
each of those SSD rounds costs a one-row request its speed: a new server's first client, and the first
prompts of every benchmark run, paid for it. The clocks are kept per setup (CPU and its flags, cores
and threads, target and draft files, K, dtype, whether the target multiplies by file blocks and runs a
compiled step), since each moves the balance. A remembered clock is one sample: the process re-measures
the slower mode as usual and its own rounds replace the memory within a window.

The file is `<cache>/auto/clocks.json`; deleting it (or SAGUARO_AUTO_MEMORY=0) starts from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "clocks.json"


def enabled() -> bool:
    return os.environ.get("SAGUARO_AUTO_MEMORY", "1") != "0"


def cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model + " " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))


def file_identity(path: str | Path | None) -> str:
    """A checkpoint's name, size and modification time (its directory's config.json for a directory)."""
    if path is None:
        return "none"
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        st = p.stat()
    except OSError:
        return str(path)
    return f"{p.name}:{st.st_size}:{int(st.st_mtime)}"


def setup_key(**parts) -> str:
    """A short digest of everything that moves the balance between the modes."""
    text = json.dumps({"cpu": cpu_identity(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(directory: Path, key: str) -> dict:
    """The remembered clocks of this setup: {"band/mode": seconds per token}; {} when none (or unreadable)."""
    if not enabled():
        return {}
    try:
        return dict(json.loads((directory / FILE).read_text()).get(key, {}))
    except (OSError, ValueError, AttributeError):
        return {}


def save(directory: Path, key: str, clocks: dict[str, float]) -> None:
    """Remember this setup's clocks (other setups' entries kept); a write that fails only logs."""
    if not enabled() or not clocks:
        return
    path = directory / FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known[key] = clocks
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not remember the auto clocks in %s: %s", path, e)


REMEMBER_EVERY = 200  # auto rounds between writes (a server may be killed rather than closed)


class RemembersClocks:
    """For an engine with a round rule (mode auto): one measured round, and where its clocks are kept
    (`auto_memory`: directory, key)."""

    round_rule = None
    auto_memory: tuple[Path, str] | None = None
    _auto_rounds = 0

    def measured_round(self, seqs: list, speculative: str, run) -> None:
        """Ask the round rule which mode `seqs` run now, run it (`run(choice)`), and tell the rule how long
        it took and how many tokens it emitted. Every round is reported, including SD's rounds in which
        its draft reads a prompt: leaving those out made SD's clock read fast (auto ran SD at 0.96x AR
        while timing it 13% faster; timing all, 0.99x at T = 0.7). The rule itself leaves out only the
        first round after a switch (auto.MeasuredRounds)."""
        sampled = sum(not s.params.greedy for s in seqs)
        choice = self.round_rule(len(seqs), sampled)
        before = sum(len(s.output_ids) for s in seqs)
        t0 = time.perf_counter()
        for s in seqs:
            s.stats.auto_reason, s.stats.speculative_mode = choice.reason, speculative
        run(choice)
        if choice.mode == "ar":
            for s in seqs:
                s.stats.ar_rounds += 1
        emitted = sum(len(s.output_ids) for s in seqs) - before
        self.round_rule.observe(choice, len(seqs), sampled, time.perf_counter() - t0, emitted)
        self._auto_rounds += 1
        if self._auto_rounds % REMEMBER_EVERY == 0:
            self.remember_clocks()

    def remember_clocks(self) -> None:
        if self.auto_memory is not None and hasattr(self.round_rule, "remembered"):
            save(*self.auto_memory, self.round_rule.remembered())
