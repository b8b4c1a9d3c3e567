"""The draft worker: an SSDDrafter in its own process (own cores, GPU or host), over torch.distributed.

Rank 0 is the engine, rank 1 the worker; they meet by TCP (`--master-addr/--master-port`), so
the worker may run on another host. After answering a RESPOND with the next speculations the
worker at once builds the tree for them, while the engine's target verifies: that overlap is SSD.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from saguaro.engine.speculators import head_to_vocab
from saguaro.sampling import SamplingParams
from saguaro.ssd import wire
from saguaro.ssd.drafter import Speculation, SSDDrafter

log = logging.getLogger(__name__)

ENGINE, WORKER = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(engine_device: str, worker_device: str) -> str:
    """nccl between two distinct GPUs; gloo otherwise (CPU, or both on one GPU, which nccl refuses)."""
    a, b = torch.device(engine_device), torch.device(worker_device)
    if a.type == b.type == "cuda" and (a.index or 0) != (b.index or 0):
        return "nccl"
    return "gloo"


def pin(cores: list[int] | None, threads: int | None) -> None:
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- worker side

def serve(args) -> None:
    from saguaro.engine.speculative import load_draft
    from saguaro.loader import load_model, resolve_checkpoint
    from saguaro.tokenizer import Tokenizer

    pin(args.cores, args.threads)
    comm = args.device if args.backend == "nccl" else "cpu"  # where wire tensors live
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    dist.init_process_group(args.backend, init_method=f"tcp://{args.master_addr}:{args.master_port}",
                            rank=WORKER, world_size=2, timeout=datetime.timedelta(seconds=args.timeout))
    dtype = getattr(torch, args.dtype)
    target = load_model(args.target, dtype=dtype, device=args.device)  # for its embeddings and vocabulary
    tokenizer = Tokenizer.load(resolve_checkpoint(args.target), target.config.eos_token_ids)
    draft = load_draft(args.draft, target, tokenizer)
    vocab = target.config.vocab_size
    del target
    drafter = SSDDrafter(draft, vocab, args.k, args.fanout, c=args.c, fallback=args.fallback)
    head = draft.output_token_ids
    wire.send(wire.Ready(args.k, vocab if head is None else len(head)), ENGINE, comm)
    while True:
        msg = wire.recv(ENGINE, comm)
        if isinstance(msg, wire.Shutdown):
            break
        if isinstance(msg, wire.Prefill):
            params = [SamplingParams(temperature=t, top_p=p, top_k=k)
                      for t, p, k in zip(msg.temperatures, msg.top_ps, msg.top_ks)]
            drafter.prefill(msg.seq_ids, msg.prompts, params, msg.seeds)
        elif isinstance(msg, wire.Retire):
            drafter.retire(msg.keep)
        elif isinstance(msg, wire.Respond):
            drafter.set_policy(msg.fanout, msg.fallback, msg.lookup_min_match)
            tree_s = drafter.tree_s  # the tree these outcomes are looked up in
            specs = drafter.respond(msg.outcomes, msg.new_tokens)
            sampled = [i for i, s in enumerate(specs) if s.q is not None]
            q = None
            if sampled:
                q = torch.stack([specs[i].q for i in sampled])  # over the draft head
                q = q if head is not None else drafter.target_q(q)
            wire.send(wire.Speculations([s.tokens for s in specs], [s.hit for s in specs], sampled, q,
                                        tree_s, drafter.fallback_s, [s.source == "lookup" for s in specs]),
                      ENGINE, comm)
            drafter.build_tree()  # overlaps the engine's verification of these speculations
    dist.destroy_process_group()


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
    p.add_argument("--timeout", type=float, default=60.0)
    return p


# ----------------------------------------------------------------------------- engine side

class WorkerError(RuntimeError):
    """The worker could not be started, died, or stopped answering."""


class RemoteDrafter:
    """The engine's handle on a draft worker process (spawned here unless `spawn` is False)."""

    def __init__(self, target: str, draft: str, k: int, fanout: list[int], target_vocab: int,
                 c: float = 1.0, fallback: str = "neural", dtype: str = "float32", device: str = "cpu",
                 cores: list[int] | None = None, threads: int = 1, timeout: float = 60.0,
                 master_addr: str = "127.0.0.1", master_port: int | None = None, spawn: bool = True,
                 head_ids: torch.Tensor | None = None, engine_device: str = "cpu"):
        """device: the worker's (draft's) device; engine_device: the target's."""
        self.k, self.vocab, self.head_ids = k, target_vocab, head_ids
        backend = backend_for(engine_device, device)
        self.comm = engine_device if backend == "nccl" else "cpu"
        self.tree_s = self.fallback_s = 0.0  # the worker's times, as reported with its last answer
        self.process = None
        port = master_port or free_port()
        if spawn:
            cmd = [sys.executable, "-m", "saguaro.ssd.worker", "--master-addr", master_addr, "--master-port", str(port),
                   "--target", str(target), "--draft", str(draft), "--k", str(k),
                   "--fanout", ",".join(map(str, fanout)), "--c", str(c), "--fallback", fallback,
                   "--dtype", dtype, "--device", device, "--backend", backend, "--threads", str(threads), "--timeout", str(timeout)]
            if cores:
                cmd += ["--cores", ",".join(map(str, cores))]
            self.process = subprocess.Popen(cmd)
        try:
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{port}", rank=ENGINE,
                                    world_size=2, timeout=datetime.timedelta(seconds=timeout))
            ready = wire.recv(WORKER, self.comm)
        except Exception as e:
            self._kill()
            raise WorkerError(f"draft worker did not start: {e}") from None
        if not isinstance(ready, wire.Ready) or ready.k != k:
            self._kill()
            raise WorkerError(f"draft worker answered {ready!r}")

    def _call(self, fn, *args):
        if self.process is not None and self.process.poll() is not None:
            raise WorkerError(f"draft worker exited with status {self.process.returncode}")
        try:
            return fn(*args)
        except Exception as e:  # gloo raises RuntimeError subclasses for dead peers and timeouts
            raise WorkerError(f"draft worker lost: {e}") from None

    def prefill(self, seq_ids, prompts, params, seeds) -> None:
        msg = wire.Prefill(seq_ids, prompts, [float(p.temperature) for p in params], [float(p.top_p) for p in params],
                           [p.top_k for p in params], seeds)
        self._call(wire.send, msg, WORKER, self.comm)

    def respond(self, outcomes, new_tokens, fanout: list[int], fallback: str,
                lookup_min_match: int = 0) -> list[Speculation]:
        self._call(wire.send, wire.Respond(outcomes, new_tokens, list(fanout), fallback, lookup_min_match),
                   WORKER, self.comm)
        msg = self._call(wire.recv, WORKER, self.comm)
        self.tree_s, self.fallback_s = msg.tree_s, msg.fallback_s
        qs = {row: head_to_vocab(msg.q[j], self.head_ids, self.vocab) for j, row in enumerate(msg.sampled_rows)}
        return [Speculation(t, qs.get(i), hit=h, source="lookup" if lk else "tree" if h else fallback)
                for i, (t, h, lk) in enumerate(zip(msg.tokens, msg.hits, msg.lookups))]

    def build_tree(self) -> None:
        """The worker starts on its own right after responding."""

    def finish_tree(self) -> None:
        pass

    def retire(self, keep: list[int]) -> None:
        self._call(wire.send, wire.Retire(keep), WORKER, self.comm)

    def close(self) -> None:
        try:
            if self.process is None or self.process.poll() is None:
                wire.send(wire.Shutdown(), WORKER, self.comm)
        except Exception:
            pass
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s worker: %(message)s")
    serve(worker_parser().parse_args(argv))


if __name__ == "__main__":
    main()
