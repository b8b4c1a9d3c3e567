"""`saguaro chat`: the streaming REPL keeps the conversation and reads piped stdin."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from saguaro.cli import main
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams

@pytest.fixture
def one_thread():
    """One torch thread: far faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TURNS = ["Name three colors.", "Which of them is the color of the sky?"]


def ar_chat(embedded, turns: list[str], max_tokens: int) -> list[str]:
    """Greedy replies, each turn seeing the conversation so far."""
    _, model, tokenizer = embedded
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        seq = Sequence(tokenizer.encode_chat(messages), SamplingParams(temperature=0, max_tokens=max_tokens))
        AREngine(model, tokenizer.stop_token_ids).run([seq])
        replies.append(tokenizer.decode(seq.output_ids))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_chat_keeps_history_and_prints_metrics(embedded, one_thread, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TURNS) + "\n/exit\nnot read\n"))
    assert main(["chat", "--max-tokens", "10", "--metrics", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(r + "\n" for r in ar_chat(embedded, TURNS, 10))
    lines = out.err.strip().splitlines()
    assert len(lines) == 2 and all("tokens/s" in line and "TTFT" in line for line in lines)


def test_chat_piped_in_sd_mode_ends_at_eof(embedded, one_thread):
    proc = subprocess.run([sys.executable, "-m", "saguaro.cli", "chat", "--mode", "sd", "--k", "3",
                           "--max-tokens", "10", "--metrics", "--threads", "1"],
                          input=TURNS[0] + "\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ar_chat(embedded, TURNS[:1], 10)[0] + "\n"
    assert "acceptance" in proc.stderr
