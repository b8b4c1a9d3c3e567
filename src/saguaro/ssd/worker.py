"""The draft worker: an SSDDrafter in its own process (own cores, GPU or host).

It meets its engine on the engine's private channel (ssd/channel.py: a TCPStore at
`--master-addr/--master-port`, then a two-rank process group of its own). After answering a
RESPOND with the next speculations the worker at once builds the tree for them, while the
engine's target verifies: that overlap is SSD. The engine's side is ssd/client.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

import torch

from saguaro.loader import load_model, resolve_checkpoint
from saguaro.sampling import SamplingParams
from saguaro.speculators.draft import load_draft
from saguaro.ssd import wire
from saguaro.ssd.channel import Channel, WorkerEnd
from saguaro.ssd.client import CONNECT_S
from saguaro.ssd.drafter import SSDDrafter
from saguaro.tokenizer import Tokenizer

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


def _load(args) -> tuple[SSDDrafter, int]:
    """The drafter, and the size of the draft's output vocabulary (what q travels over)."""
    target = load_model(args.target, dtype=getattr(torch, args.dtype), device=args.device)  # embeddings, vocab
    tokenizer = Tokenizer.load(resolve_checkpoint(args.target), target.config.eos_token_ids)
    draft = load_draft(args.draft, target, tokenizer)
    vocab = target.config.vocab_size
    del target
    head = draft.output_token_ids
    return SSDDrafter(draft, vocab, args.k, args.fanout, c=args.c, fallback=args.fallback), \
        vocab if head is None else len(head)


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


def worker_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="saguaro draft-worker")
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--target", required=True, help="target checkpoint (for embeddings and vocabulary)")
    p.add_argument("--draft", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--fanout", type=lambda s: [int(x) for x in s.split(",")], required=True)
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--fallback", choices=["neural", "ngram", "none"], default="neural")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="the draft's device (cpu, cuda:1, ...)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cores", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--timeout", type=float, default=CONNECT_S, help="seconds to reach the engine's store")
    return p


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s worker: %(message)s")
    serve(worker_parser().parse_args(argv))


if __name__ == "__main__":
    main()
