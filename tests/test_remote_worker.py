"""A draft worker started by hand (`saguaro draft-worker --listen`) on loopback, engines attaching to it:
exact, one engine after another, a wrong token refused, a crashed client survived."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from saguaro.engine.sequence import Sequence
from saguaro.sampling import SamplingParams
from saguaro.ssd.channel import TOKEN_ENV

PROMPTS = ["def is_prime(n):", "List three colors of the rainbow:"]
SECRET = "s3cret-for-tests"
SERVING = "serving an engine"
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


class Worker:
    """`saguaro draft-worker --listen 127.0.0.1:PORT` in its own process, its log in a file."""

    def __init__(self, draft_dir, log_path):
        from saguaro.ssd.worker import free_port

        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "saguaro.cli", "draft-worker", "--listen", self.address,
                                          "--draft", str(draft_dir), "--token", SECRET, "--threads", "1"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_for("listening on", 1)

    def log(self) -> str:
        return self.log_path.read_text()

    def served(self) -> int:
        return self.log().count(SERVING)

    def wait_for(self, text: str, count: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while self.log().count(text) < count:
            assert self.proc.poll() is None, f"the worker exited:\n{self.log()}"
            assert time.monotonic() < end, f"no {text!r} in the worker's log:\n{self.log()}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def worker(draft_dir, tmp_path_factory):
    w = Worker(draft_dir, tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    w.proc.send_signal(signal.SIGINT)
    try:
        w.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        w.proc.wait()


@pytest.fixture(scope="module")
def ar():
    from saguaro import LLM

    with LLM(mode="ar") as llm:
        yield llm


@pytest.fixture(scope="module")
def want(ar):
    return [o.token_ids for o in ar.generate(PROMPTS, GREEDY)]


def run_attached(ar, draft_dir, worker, token=SECRET):
    """An SSD engine on the AR LLM's target that attaches to the worker; greedy outputs and lookups."""
    engine = ar.make_engine("ssd", str(draft_dir), 3, lookup_min_match=0, draft_worker=worker.address,
                            worker_token=token, worker_timeout=60)
    try:
        assert engine.degraded is None and engine.drafter.process is None  # nothing spawned here
        seqs = [Sequence(ar.tokenizer.encode(p), GREEDY) for p in PROMPTS]
        engine.run(seqs)
        assert engine.degraded is None
        return [s.output_ids for s in seqs], sum(s.stats.cache_lookups for s in seqs)
    finally:
        engine.close()


def test_generate_with_draft_worker_equals_ar(worker, draft_dir, want, monkeypatch, capsys):
    """saguaro generate --mode ssd --draft-worker HOST:PORT: AR's greedy output, drafted by the worker."""
    from saguaro.cli import main

    monkeypatch.setenv(TOKEN_ENV, SECRET)
    before = worker.served()
    rc = main(["generate", "--mode", "ssd", "--draft-worker", worker.address, "--draft", str(draft_dir), "--k", "3",
               "--lookup-min-match", "0", "--max-tokens", "24", "--ignore-eos", "--json", *PROMPTS])
    assert rc == 0
    outs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["token_ids"] for o in outs] == want
    for o in outs:
        assert o["metrics"]["mode"] == "ssd" and "degraded" not in o["metrics"]
        assert "cache_hit_rate" in o["metrics"]  # the worker's trees were looked up
    assert worker.served() == before + 1


def test_engines_one_after_another(worker, ar, draft_dir, want):
    """The worker serves the next engine once the previous one closed, each exactly."""
    before = worker.served()
    for _ in range(2):
        outputs, lookups = run_attached(ar, draft_dir, worker)
        assert outputs == want and lookups > 0
    assert worker.served() == before + 2


def test_wrong_token_is_refused(worker, ar, draft_dir, monkeypatch, capsys):
    from saguaro.cli import main
    from saguaro.ssd.client import WorkerRefused

    with pytest.raises(WorkerRefused, match="wrong token"):
        ar.make_engine("ssd", str(draft_dir), 3, draft_worker=worker.address, worker_token="not-it")
    monkeypatch.setenv(TOKEN_ENV, "not-it")
    rc = main(["generate", "--mode", "ssd", "--draft-worker", worker.address, "--draft", str(draft_dir), "--k", "3",
               "--max-tokens", "4", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "wrong token" in err and len(err.splitlines()) == 1, err
    assert worker.proc.poll() is None


CLIENT = """
import json, sys, time
import torch
from saguaro.sampling import SamplingParams
from saguaro.ssd.client import RemoteDrafter
address, token, vocab, head = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
k = 3
d = RemoteDrafter(None, None, k, [4, 2, 1, 1], vocab, address=address, token=token, head_ids=torch.tensor(head),
                  timeout=60)
d.prefill([0], [[1, 2, 3, 4, 5]], [SamplingParams(temperature=0)], [None])
d.respond([None], [[6]], [4, 2, 1, 1], "neural")  # the worker now builds its tree for this round
print("mid-run", flush=True)
time.sleep(600)
"""


def test_worker_survives_a_killed_client(worker, ar, draft_dir, want):
    """A client killed mid-run: the worker notices, goes back to listening, and serves the next engine."""
    head = json.loads((draft_dir / "config.json").read_text())["saguaro_output_token_ids"]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, worker.address, SECRET,
                               str(ar.target.config.vocab_size), json.dumps(head)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "mid-run"
        client.kill()
        client.wait()
    finally:
        if client.poll() is None:
            client.kill()
    outputs, lookups = run_attached(ar, draft_dir, worker)
    assert outputs == want and lookups > 0
    assert worker.proc.poll() is None


def test_listen_beyond_loopback_needs_a_token(monkeypatch):
    from saguaro.ssd.worker import listen, listen_parser

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="token"):
        listen(listen_parser().parse_args(["--listen", "0.0.0.0:7070"]))
    with pytest.raises(ValueError, match="HOST:PORT"):
        listen(listen_parser().parse_args(["--listen", "7070"]))


def test_worker_listens_on_loopback_only(worker):
    """The store serves on the address given, not on every interface (a TCPStore's own default)."""
    import socket

    from saguaro.ssd.channel import _local_address

    try:
        outside = _local_address("10.255.255.1", 9)
    except OSError:
        pytest.skip("no route off this machine")
    if outside.startswith("127."):
        pytest.skip("no non-loopback address")
    port = int(worker.address.rsplit(":", 1)[1])
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect((outside, port))


def test_worker_loads_the_draft_on_the_embeddings_alone(embedded, draft_dir):
    """The worker's draft (the target's embedding matrix read alone, no target, no tokenizer) is the
    engine's draft, weight for weight."""
    from saguaro.speculators.draft import load_draft
    from saguaro.ssd.worker import load_worker_draft

    path, target, tokenizer = embedded
    alone, vocab = load_worker_draft(path, draft_dir, torch.float32, "cpu")
    whole = load_draft(draft_dir, target, tokenizer)
    assert vocab == target.config.vocab_size
    a, b = alone.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
