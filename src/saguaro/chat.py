"""`saguaro chat`: a streaming REPL over the checkpoint's chat template, keeping the conversation.

Reads lines from stdin (so it can be piped); `/exit`, `/quit` or end of input leaves, `/reset`
forgets the conversation. Each reply streams as it is generated; with `metrics` a line on stderr
gives its tokens/s, time to first token, and for speculative modes acceptance and cache hit rate.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from saguaro.engine.base import ContextLengthError
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams
from saguaro.serve.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

EXIT = ("/exit", "/quit")


def reply(llm, messages: list[dict[str, str]], params: SamplingParams, out: TextIO) -> tuple[str, Sequence]:
    """Generate the assistant's next message, writing it to `out` as it comes; return its text."""
    detok = IncrementalDetokenizer(llm.tokenizer, params.stop)
    seq = Sequence(llm.tokenizer.encode_chat(messages), params, stop_check=detok.stops)  # the engine stops it
    engine = llm.engine
    engine.add(seq)
    while not seq.finished:
        engine.step()
        text = detok.update(seq.output_ids, final=seq.finished)
        if text:
            out.write(text)
            out.flush()
    return detok.sent, seq


def metrics_line(seq: Sequence) -> str:
    m = seq.metrics()
    parts = [f"{m['generated_tokens']} tokens", f"{m['tokens_per_s']:.1f} tokens/s",
             f"TTFT {1000 * m['ttft_s']:.0f} ms"]
    if "acceptance_rate" in m:
        parts.append(f"acceptance {m['acceptance_rate']:.2f}")
    if "cache_hit_rate" in m:
        parts.append(f"hit rate {m['cache_hit_rate']:.2f}")
    return "[" + ", ".join(parts) + "]"


def run_chat(llm, params: SamplingParams, show_metrics: bool = False, system: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The REPL; returns the number of replies given."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if not llm.tokenizer.has_chat_template:
        raise ValueError("this checkpoint has no chat template; use `saguaro generate` instead")
    interactive = stdin.isatty()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    replies = 0
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text in EXIT:
            break
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer, seq = reply(llm, messages, params, stdout)
        except ContextLengthError as e:
            messages.pop()
            print(f"[{e}; /reset to start over]", file=stderr)
            continue
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": answer})
        replies += 1
        if show_metrics:
            print(metrics_line(seq), file=stderr, flush=True)
    return replies
