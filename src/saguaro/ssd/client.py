"""The engine's handle on a draft worker process, over the engine's own private channel."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from saguaro.speculators import head_to_vocab
from saguaro.ssd import wire
from saguaro.ssd.channel import HELLO, READY, TOKEN_ENV, Attach, EngineEnd, Refused, parse_address
from saguaro.ssd.drafter import Speculation

log = logging.getLogger(__name__)

# A round's answer is the worker's fallback drafting for the misses plus (for the next round) its
# tree: tens of ms on a CPU for the embedded pair, and the first answer after a prefill includes
# the draft's prefill of the new prompts (about a second for a full batch of long prompts on one
# core). 10 s is a few seconds past the slowest of these, so a hung worker costs at most 10 s.
WORKER_TIMEOUT_S = 10.0
CONNECT_S = 30.0  # a live child that has not reached the store by then (importing torch) is stuck
LOAD_S = 120.0  # a live child loading its draft; exits are seen at once, whatever these limits
REACH_S = 5.0  # to open a connection to a worker started by hand (a wrong address fails this fast)
TURN_S = 30.0  # for a busy worker started by hand to finish with the engine before this one


class WorkerError(RuntimeError):
    """The worker could not be started, died, or stopped answering."""


class WorkerRefused(WorkerError):
    """A worker started by hand refused this engine (wrong token, another target or draft)."""


def backend_for(engine_device: str, worker_device: str) -> str:
    """nccl between two distinct GPUs; gloo otherwise (CPU, or both on one GPU, which nccl refuses)."""
    a, b = torch.device(engine_device), torch.device(worker_device)
    if a.type == b.type == "cuda" and (a.index or 0) != (b.index or 0):
        return "nccl"
    return "gloo"


def worker_command(port: int, target, draft, k: int, fanout: list[int], c: float, fallback: str, dtype: str,
                   device: str, backend: str, threads: int, cores: list[int] | None,
                   master_addr: str = "127.0.0.1") -> list[str]:
    cmd = [sys.executable, "-m", "saguaro.ssd.worker", "--master-addr", master_addr, "--master-port", str(port),
           "--target", str(target), "--draft", str(draft), "--k", str(k), "--fanout", ",".join(map(str, fanout)),
           "--c", str(c), "--fallback", fallback, "--dtype", dtype, "--device", device, "--backend", backend,
           "--threads", str(threads), "--timeout", str(CONNECT_S)]
    return cmd + (["--cores", ",".join(map(str, cores))] if cores else [])


class RemoteDrafter:
    """The engine's handle on a draft worker process: spawned here, or (`address` "HOST:PORT") one
    started by hand with `saguaro draft-worker --listen`, attached to with `token` (default: the
    SAGUARO_WORKER_TOKEN environment variable).

    Start-up watches the child: an exit is noticed within POLL_S, not at a rendezvous timeout.
    After start-up every answer must come within `timeout` seconds; a worker that exits mid-round
    closes its socket, which ends the wait at once."""

    def __init__(self, target: str, draft: str, k: int, fanout: list[int], target_vocab: int,
                 c: float = 1.0, fallback: str = "neural", dtype: str = "float32", device: str = "cpu",
                 cores: list[int] | None = None, threads: int = 1, timeout: float = WORKER_TIMEOUT_S,
                 master_addr: str = "127.0.0.1", master_port: int | None = None, spawn: bool = True,
                 head_ids: torch.Tensor | None = None, engine_device: str = "cpu", address: str | None = None,
                 token: str | None = None):
        """device: the worker's (draft's) device; engine_device: the target's."""
        self.k, self.vocab, self.head_ids = k, target_vocab, head_ids
        self.tree_s = self.fallback_s = 0.0  # the worker's times, as reported with its last answer
        self.process = self.channel = None
        try:
            if address:
                host, port = parse_address(address)
                hello = wire.Hello(k, list(fanout), target_vocab, dtype, c, fallback, host)
                self.channel = self._attach(host, port, hello, token, timeout)
            else:
                self.channel = self._spawn(target, draft, k, fanout, c, fallback, dtype, device, cores, threads,
                                           timeout, master_addr, master_port, spawn, engine_device)
            ready = wire.recv(self.channel)
        except Refused as e:
            self._kill()
            raise WorkerRefused(str(e)) from None
        except Exception as e:
            self._kill()
            raise WorkerError(f"draft worker did not start: {e}") from None
        self._check(ready)

    def _spawn(self, target, draft, k, fanout, c, fallback, dtype, device, cores, threads, timeout, master_addr,
               master_port, spawn, engine_device):
        backend = backend_for(engine_device, device)
        comm = engine_device if backend == "nccl" else "cpu"  # where wire tensors live
        end = EngineEnd(master_addr, master_port or 0)
        if spawn:
            self.process = subprocess.Popen(worker_command(end.port, target, draft, k, fanout, c, fallback,
                                                           dtype, device, backend, threads, cores, master_addr))
        end.wait_for(HELLO, CONNECT_S, self._exit_status)
        end.wait_for(READY, LOAD_S, self._exit_status)
        return end.open(backend, timeout, comm)

    @staticmethod
    def _attach(host: str, port: int, hello: wire.Hello, token: str | None, timeout: float):
        """A worker started by hand: wait for its turn, prove the token, send the settings, join."""
        end = Attach(host, port, REACH_S)
        end.handshake(os.environ.get(TOKEN_ENV, "") if token is None else token, wire.to_bytes(hello), TURN_S)
        return end.open(timeout)

    def _check(self, ready) -> None:
        """The worker drafts with the same K and draft head as this engine expects."""
        head = self.vocab if self.head_ids is None else len(self.head_ids)
        if not isinstance(ready, wire.Ready) or ready.k != self.k or ready.head_vocab != head:
            self.close()
            raise WorkerRefused(f"draft worker answered {ready!r}, expected K={self.k} and a draft head of {head} "
                                f"tokens (the same --draft on both sides)")

    def _exit_status(self) -> str | None:
        if self.process is None or self.process.poll() is None:
            return None
        return f"draft worker exited with status {self.process.returncode}"

    def _call(self, fn, *args):
        """One exchange with the worker; any failure kills it (a worker that missed a message is
        out of step for good) and raises WorkerError."""
        gone = self._exit_status() if self.channel is not None else "draft worker closed"
        if gone is None:
            try:
                return fn(*args)
            except Exception as e:  # gloo raises RuntimeError subclasses for dead peers and timeouts
                gone = self._exit_status() or f"draft worker lost: {e}"
        self._kill()
        raise WorkerError(gone)

    def prefill(self, seq_ids, prompts, params, seeds) -> None:
        msg = wire.Prefill(seq_ids, prompts, [float(p.temperature) for p in params], [float(p.top_p) for p in params],
                           [p.top_k for p in params], seeds)
        self._call(wire.send, msg, self.channel)

    def respond(self, outcomes, new_tokens, fanout: list[int], fallback: str,
                lookup_min_match: int = 0) -> list[Speculation]:
        self._call(wire.send, wire.Respond(outcomes, new_tokens, list(fanout), fallback, lookup_min_match),
                   self.channel)
        msg = self._call(wire.recv, self.channel)
        self.tree_s, self.fallback_s = msg.tree_s, msg.fallback_s
        qs = {row: head_to_vocab(msg.q[j], self.head_ids, self.vocab) for j, row in enumerate(msg.sampled_rows)}
        return [Speculation(t, qs.get(i), hit=h, source="lookup" if lk else "tree" if h else fallback)
                for i, (t, h, lk) in enumerate(zip(msg.tokens, msg.hits, msg.lookups))]

    def build_tree(self) -> None:
        """The worker starts on its own right after responding."""

    def finish_tree(self) -> None:
        pass

    def retire(self, keep: list[int]) -> None:
        self._call(wire.send, wire.Retire(keep), self.channel)

    def close(self) -> None:
        if self.channel is not None and self._exit_status() is None:
            try:
                wire.send(wire.Shutdown(), self.channel)
                if self.process is not None:
                    self.process.wait(timeout=10)
            except Exception as e:  # a worker that cannot even shut down is killed below
                log.debug("draft worker shutdown: %s", e)
        self._kill()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.channel is not None:
            self.channel.close()
            self.channel = None

