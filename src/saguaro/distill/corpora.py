"""Existing text for teacher forcing: ShareGPT assistant turns in context, and windows of Python source.

Each corpus is a deterministic stream of items (a conversation turn, a source file; the order fixed by
the seed), each giving zero or more `Text`s. `grouped` gathers whole items into shards and tells the
cursor of the next item, which the shard records: an interrupted run starts again from there without
re-reading what came before.

Held-out data stays out: ShareGPT's held-out conversations (`prompts.SHAREGPT_EVAL_EVERY`) are skipped,
and Python files that contain a line of a held-out HumanEval problem (or define its function) are dropped.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from saguaro.prompts import HUMANEVAL_EVAL_FROM, SHAREGPT_EVAL_EVERY, _humaneval_tasks, _sharegpt_conversations
from saguaro.tokenizer import Tokenizer

ROLES = {"human": "user", "user": "user", "system": "system",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
MAX_FILE_BYTES = 256_000  # bigger .py files are mostly data tables
MIN_WINDOW = 32  # a file's last window shorter than this is dropped
MAX_WINDOWS = 8  # per file, spread over it: a shard holds whole files, and one big file should not fill it


class Text(NamedTuple):
    """Tokens to score; the target's predictions of tokens[prompt_length:] are the labels."""

    tokens: list[int]
    prompt_length: int

    @property
    def labels(self) -> int:
        return len(self.tokens) - self.prompt_length


Items = Iterator[tuple[int, list[Text]]]  # (item index, its texts)


def grouped(items: Items, rows: int) -> Iterator[tuple[int, list[Text]]]:
    """Whole items gathered until a group has >= `rows` texts (the last may have fewer), each group with
    the cursor (index) of the item after it."""
    group: list[Text] = []
    cursor = None
    for index, texts in items:
        group += texts
        cursor = index + 1
        if len(group) >= rows:
            yield cursor, group
            group = []
    if group:
        yield cursor, group


# ---------------------------------------------------------------------------------------------- ShareGPT
def sharegpt_turns(seed: int) -> list[tuple[int, int]]:
    """(conversation, turn) of every assistant turn in the train split, shuffled by `seed`."""
    out = [(c, t) for c, conv in enumerate(_sharegpt_conversations()) if c % SHAREGPT_EVAL_EVERY != 0
           for t, turn in enumerate(conv) if ROLES.get(turn.get("from")) == "assistant" and turn.get("value")]
    random.Random(seed).shuffle(out)
    return out


def context_messages(conv, turn: int, max_chars: int) -> list[dict[str, str]] | None:
    """The messages before `turn`, latest last, as many as fit in about `max_chars` (at least one).
    None when there are none or one has a role the template does not know."""
    out: list[dict[str, str]] = []
    chars = 0
    for msg in reversed(conv[:turn]):
        role = ROLES.get(msg.get("from"))
        if role is None:
            return None
        out.append({"role": role, "content": msg.get("value", "")})
        chars += len(out[-1]["content"])
        if chars >= max_chars:
            break
    return out[::-1] or None


def _template_ids(tokenizer: Tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def render_turn(tokenizer: Tokenizer, messages: list[dict[str, str]], answer: str, max_context: int,
                max_len: int) -> Text | None:
    """Context (its last `max_context` tokens) + the answer as the template writes it, through the end of turn.

    The answer's tokens are cut from the rendering of the whole exchange, so they are what the target
    would see when it writes them (no tokenisation seam at the context boundary).
    """
    context = _template_ids(tokenizer, messages, True)
    full = _template_ids(tokenizer, messages + [{"role": "assistant", "content": answer}], False)
    if full[: len(context)] != context:
        return None
    answer_ids = full[len(context):]
    stop = next((i for i, t in enumerate(answer_ids) if t in tokenizer.stop_token_ids), None)
    if stop is not None:
        answer_ids = answer_ids[: stop + 1]
    context = context[-max_context:]
    tokens = (context + answer_ids)[:max_len]
    return Text(tokens, len(context)) if len(tokens) > len(context) else None


def sharegpt_items(tokenizer: Tokenizer, seed: int, start: int = 0, max_len: int = 512,
                   max_context: int = 256) -> Items:
    """Train-split assistant turns (from the `start`-th) with the conversation before them as context."""
    conversations = _sharegpt_conversations()
    turns = sharegpt_turns(seed)
    for i in range(start, len(turns)):
        c, t = turns[i]
        messages = context_messages(conversations[c], t, 4 * max_context)
        text = None if messages is None else render_turn(
            tokenizer, messages, conversations[c][t]["value"], max_context, max_len)
        yield i, [] if text is None else [text]


# ---------------------------------------------------------------------------------------------- Python
def python_roots() -> list[Path]:
    """The standard library and this environment's site-packages."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[k]).resolve() for k in ("stdlib", "purelib")))


def python_files(roots: list[Path], max_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """Sorted .py files under `roots`; a root's own site-packages is left to the root that names it."""
    files: set[Path] = set()
    for root in roots:
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).parts
            if any(p in ("site-packages", "dist-packages") for p in rel[:-1]):
                continue
            try:
                if f.is_file() and f.stat().st_size <= max_bytes:
                    files.add(f.resolve())
            except OSError:
                continue
    return sorted(files)


def heldout_fingerprints() -> list[str]:
    """Strings that mark a held-out HumanEval problem: its `def name(` and its longer docstring lines."""
    out = []
    for task in _humaneval_tasks()[HUMANEVAL_EVAL_FROM:]:
        out.append(f"def {task['entry_point']}(")
        out += [s for line in task["prompt"].splitlines()
                if len(s := line.strip()) >= 30 and not s.startswith(("def ", "from ", "import "))]
    return out


def looks_heldout(text: str, fingerprints: list[str]) -> bool:
    return any(f in text for f in fingerprints)


def windows(ids: list[int], size: int, min_size: int = MIN_WINDOW, most: int = MAX_WINDOWS) -> list[list[int]]:
    """Consecutive `size`-token windows of `ids` (a short last one only if >= min_size); of more than
    `most`, `most` evenly spaced ones."""
    out = [ids[i : i + size] for i in range(0, len(ids), size)]
    out = [w for w in out if len(w) >= min_size]
    return out if len(out) <= most else [out[j * len(out) // most] for j in range(most)]


def source_windows(tokenizer: Tokenizer, path: Path, window: int, fingerprints: list[str]) -> list[Text]:
    """A source file's token windows (none if unreadable or like a held-out problem); all but the first
    token of a window are labels."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if not source.strip() or looks_heldout(source, fingerprints):
        return []
    return [Text(w, 1) for w in windows(tokenizer.encode(source), window)]


def python_items(tokenizer: Tokenizer, seed: int, start: int = 0, window: int = 512,
                 roots: list[Path] | None = None, fingerprints: list[str] | None = None) -> Items:
    """Python source files (from the `start`-th, in an order shuffled by `seed`), as token windows."""
    files = python_files(roots if roots is not None else python_roots())
    random.Random(seed).shuffle(files)
    marks = heldout_fingerprints() if fingerprints is None else fingerprints
    for i in range(start, len(files)):
        yield i, source_windows(tokenizer, files[i], window, marks)
