"""The draft worker: an SSDDrafter in its own process (own cores, GPU or host).

Spawned by its engine (`python -m saguaro.ssd.worker`), it meets the engine on the engine's
private channel (ssd/channel.py: a TCPStore at `--master-addr/--master-port`, then a two-rank
process group of its own). Started by hand (`saguaro draft-worker --listen HOST:PORT`, see
docs/serving.md), it owns the store instead and serves the engines that attach to it, one at a
time, each with the settings it sends (a wire.Hello). Either way, after answering a RESPOND with the
next speculations the worker at once builds the tree for them, while the engine's target verifies:
that overlap is SSD. The engine's side is ssd/client.py.

The worker loads only what it drafts with: the draft and the target's embedding matrix (read
alone), not the target or its tokenizer (the engine checked the draft's vocabulary).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

import torch

from saguaro.embedded import embedded_draft_path, embedded_target_path
from saguaro.loader import load_embeddings
from saguaro.models.transformer import CausalLM
from saguaro.sampling import SamplingParams
from saguaro.speculators.draft import load_draft_alone
from saguaro.ssd import wire
from saguaro.ssd.channel import TOKEN_ENV, Channel, Listener, Turn, WorkerEnd, is_loopback, parse_address
from saguaro.ssd.client import CONNECT_S
from saguaro.ssd.drafter import SSDDrafter

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cores: list[int] | None, threads: int | None) -> None:
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    if threads:
        torch.set_num_threads(threads)


def load_worker_draft(target, draft, dtype: torch.dtype, device: str) -> tuple[CausalLM, int]:
    """The draft on the target's embeddings, and the target's vocabulary size."""
    embeddings, vocab = load_embeddings(target, dtype=dtype, device=device)
    model = load_draft_alone(draft, embeddings, vocab, dtype, device)  # on saguaro's CPU kernels where they apply
    return model, vocab


def make_drafter(draft: CausalLM, vocab: int, k: int, fanout: list[int], c: float,
                 fallback: str) -> tuple[SSDDrafter, int]:
    """The drafter, and the size of the draft's output vocabulary (what q travels over)."""
    head = draft.output_token_ids
    return SSDDrafter(draft, vocab, k, fanout, c=c, fallback=fallback), vocab if head is None else len(head)


def _load(args) -> tuple[SSDDrafter, int]:
    draft, vocab = load_worker_draft(args.target, args.draft, getattr(torch, args.dtype), args.device)
    return make_drafter(draft, vocab, args.k, args.fanout, args.c, args.fallback)


def _speculations(drafter: SSDDrafter, msg: wire.Respond) -> wire.Speculations:
    drafter.set_policy(msg.fanout, msg.fallback, msg.lookup_min_match)
    tree_s = drafter.tree_s  # the tree these outcomes are looked up in
    specs = drafter.respond(msg.outcomes, msg.new_tokens)
    sampled = [i for i, s in enumerate(specs) if s.q is not None]
    q = None
    if sampled:
        q = torch.stack([specs[i].q for i in sampled])  # over the draft head
        q = q if drafter.draft.output_token_ids is not None else drafter.target_q(q)
    return wire.Speculations([s.tokens for s in specs], [s.hit for s in specs], sampled, q,
                             tree_s, drafter.fallback_s, [s.source == "lookup" for s in specs])


def _loop(drafter: SSDDrafter, channel: Channel) -> None:
    while not isinstance(msg := wire.recv(channel), wire.Shutdown):
        if isinstance(msg, wire.Prefill):
            params = [SamplingParams(temperature=t, top_p=p, top_k=k)
                      for t, p, k in zip(msg.temperatures, msg.top_ps, msg.top_ks)]
            drafter.prefill(msg.seq_ids, msg.prompts, params, msg.seeds)
        elif isinstance(msg, wire.Retire):
            drafter.retire(msg.keep)
        elif isinstance(msg, wire.Respond):
            wire.send(_speculations(drafter, msg), channel)
            drafter.build_tree()  # overlaps the engine's verification of these speculations


def serve(args) -> None:
    pin(args.cores, args.threads)
    comm = args.device if args.backend == "nccl" else "cpu"  # where wire tensors live
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    end = WorkerEnd(args.master_addr, args.master_port, args.timeout)
    drafter, head_vocab = _load(args)
    channel = end.open(args.backend, comm)
    try:
        wire.send(wire.Ready(args.k, head_vocab), channel)
        _loop(drafter, channel)
    except RuntimeError as e:  # the engine closed its end without a Shutdown (it exited or gave up on us)
        log.warning("engine gone: %s", e)
    finally:
        channel.close()


# ----------------------------------------------------------------------------- started by hand

JOIN_S = 30.0  # an engine that asked for a turn and has not joined by then is gone


class Drafts:
    """A listening worker's draft in each dtype its engines ask for, each loaded once."""

    def __init__(self, target, draft, device: str):
        self.target, self.draft, self.device = target, draft, device
        self.loaded: dict[str, tuple[CausalLM, int]] = {}

    def get(self, dtype: str) -> tuple[CausalLM, int]:
        if dtype not in self.loaded:
            self.loaded[dtype] = load_worker_draft(self.target, self.draft, getattr(torch, dtype), self.device)
        return self.loaded[dtype]

    @property
    def vocab(self) -> int:
        return next(iter(self.loaded.values()))[1]


def refusal(hello: wire.Hello, vocab: int) -> str | None:
    """Why this worker cannot serve an engine with these settings, if it cannot."""
    if hello.protocol != wire.PROTOCOL:
        return f"the engine speaks protocol {hello.protocol}, this worker {wire.PROTOCOL} (same saguaro on both)"
    if hello.vocab != vocab:
        return (f"the engine's target has a vocabulary of {hello.vocab}, this worker's {vocab} "
                f"(start the worker with the engine's --target)")
    if hello.k < 1 or len(hello.fanout) != hello.k + 1:
        return f"bad settings: k={hello.k}, fan-out {hello.fanout}"
    return None


def read_hello(data: bytes, vocab: int) -> tuple[wire.Hello | None, str | None]:
    """The engine's settings, and why they cannot be served (None: they can)."""
    try:
        hello = wire.from_bytes(data)
    except Exception as e:  # struct or enum errors: not a Hello this worker can read
        return None, f"unreadable settings ({e})"
    if not isinstance(hello, wire.Hello):
        return None, f"expected a Hello, got {type(hello).__name__}"
    return hello, refusal(hello, vocab)


def serve_turn(turn: Turn, drafts: Drafts) -> None:
    """Serve one engine from its Hello to its Shutdown (or its end: the caller goes on listening)."""
    hello, why = read_hello(turn.hello, drafts.vocab)
    if why:
        log.warning("refused an engine: %s", why)
        turn.refuse(why)
        return
    try:
        draft, vocab = drafts.get(hello.dtype)
        drafter, head_vocab = make_drafter(draft, vocab, hello.k, hello.fanout, hello.c, hello.fallback)
    except Exception as e:  # out of memory, a dtype the device lacks, ...
        log.warning("refused an engine: %s", e)
        turn.refuse(f"cannot draft in {hello.dtype}: {e}")
        return
    channel = turn.accept(hello.host)
    if channel is None:
        log.info("the engine gave up before it was served")
        return
    log.info("serving an engine (k=%d, fan-out %s, %s)", hello.k, hello.fanout, hello.dtype)
    try:
        wire.send(wire.Ready(hello.k, head_vocab), channel)
        _loop(drafter, channel)
        log.info("the engine closed")
    finally:
        channel.close()


def listen(args) -> None:
    """Serve engines that attach to HOST:PORT, one after another, until interrupted."""
    host, port = parse_address(args.listen)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    if not token and not is_loopback(host):
        raise ValueError(f"--listen {args.listen} reaches beyond this machine: give a shared secret "
                         f"(--token or {TOKEN_ENV}), and keep the port on a private network")
    pin(args.cores, args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    drafts = Drafts(args.target or embedded_target_path(), args.draft or embedded_draft_path(), args.device)
    drafts.get(args.dtype)  # loaded before the first engine comes, and checked
    try:
        listener = Listener(host, port, JOIN_S)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    log.info("draft worker listening on %s:%d%s", host, port, "" if token else " (no token: loopback only)")
    while True:
        turn = listener.next_turn(token)
        if turn is None:
            continue
        try:
            serve_turn(turn, drafts)
        except Exception as e:  # the engine crashed or its host went away: serve the next one
            log.warning("engine lost: %s", e)


def listen_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of `saguaro draft-worker` (the engine sends K, fan-out, dtype and the rest)."""
    p = p or argparse.ArgumentParser(prog="saguaro draft-worker")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve engines on, e.g. 127.0.0.1:7070 (0.0.0.0:PORT only on a private network)")
    p.add_argument("--target", help="the engines' target checkpoint, for its embeddings (default: embedded)")
    p.add_argument("--draft", help="draft checkpoint (default: the embedded distilled draft)")
    p.add_argument("--device", default="cpu", help="the draft's device (cpu, cuda:0, ...)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--cores", type=_ints, help="CPU cores to run on, e.g. 2,3")
    p.add_argument("--dtype", default="float32", choices=list(wire.DTYPES),
                   help="load the draft in this dtype at start (engines asking another get it loaded then)")
    p.add_argument("--token", help=f"shared secret engines must prove (default: ${TOKEN_ENV}); required "
                                   "unless listening on loopback")
    return p


# ----------------------------------------------------------------------------- arguments

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def worker_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of a worker its engine spawns (python -m saguaro.ssd.worker)."""
    p = p or argparse.ArgumentParser(prog="python -m saguaro.ssd.worker")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--target", required=True, help="target checkpoint (for embeddings and vocabulary)")
    p.add_argument("--draft", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--fanout", type=_ints, required=True)
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--fallback", choices=["neural", "ngram", "none"], default="neural")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="the draft's device (cpu, cuda:1, ...)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cores", type=_ints)
    p.add_argument("--timeout", type=float, default=CONNECT_S, help="seconds to reach the engine's store")
    return p


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s worker: %(message)s")
    serve(worker_parser().parse_args(argv))


if __name__ == "__main__":
    main()
