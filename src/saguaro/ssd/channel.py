"""A private link between one engine and its draft worker: its own TCPStore and process group.

Never the default process group, so any number of engines (each with its worker) live in one
process, and closing one never touches another's. The engine end is the store's master (on a port
the OS picks); the worker connects, says "hello", loads its draft, says "ready", and only then do
both ends build the group, so the engine can watch the child process (poll) the whole time it
waits instead of sitting in a rendezvous that only a timeout ends.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENGINE, WORKER = 0, 1
HELLO, READY = "hello", "ready"
POLL_S = 0.02  # how often the engine looks at the child and the store while it waits
TAG = 0


class ChannelError(RuntimeError):
    """The other end never came, went away, or stopped answering."""


def _seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def _group(backend: str, store, rank: int, timeout: float):
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _seconds(timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    return dist.ProcessGroupGloo(store, rank, 2, _seconds(timeout))


class Channel:
    """Point-to-point sends and receives to the one peer; `device` is where the backend wants
    tensors (cuda for nccl, cpu for gloo)."""

    def __init__(self, store, group, peer: int, device: str = "cpu"):
        self.store, self.group, self.peer, self.device = store, group, peer, device

    def send(self, tensor: torch.Tensor) -> None:
        self.group.send([tensor.to(self.device).contiguous()], self.peer, TAG).wait()

    def recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """Fill `tensor` (on `device`) from the peer; the group's timeout bounds the wait."""
        self.group.recv([tensor], self.peer, TAG).wait()
        return tensor

    def close(self) -> None:
        group, self.group, self.store = self.group, None, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except Exception as e:  # the peer may be gone already
                log.debug("closing the channel: %s", e)


class EngineEnd:
    """The engine's side before the worker has joined: a listening store and a port to hand out."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.store = dist.TCPStore(host, port, 2, True, timeout=_seconds(30), wait_for_workers=False)
        self.host, self.port = host, self.store.port

    def wait_for(self, key: str, deadline_s: float, alive: Callable[[], str | None]) -> None:
        """Wait until the worker sets `key`; raise at once if `alive()` says why it is not (exited)."""
        end = time.monotonic() + deadline_s
        while not self.store.check([key]):
            gone = alive()
            if gone:
                raise ChannelError(gone)
            if time.monotonic() > end:
                raise ChannelError(f"no {key!r} from the draft worker within {deadline_s:.0f} s")
            time.sleep(POLL_S)

    def open(self, backend: str, timeout: float, device: str = "cpu") -> Channel:
        """The group, once the worker is ready; `timeout` bounds every later wait for an answer."""
        try:
            group = _group(backend, self.store, ENGINE, timeout)
        except Exception as e:
            raise ChannelError(f"draft worker did not join: {e}") from None
        return Channel(self.store, group, WORKER, device)


class WorkerEnd:
    """The worker's side: connect to the engine's store, announce progress, then join the group."""

    def __init__(self, host: str, port: int, connect_timeout: float):
        self.store = dist.TCPStore(host, port, 2, False, timeout=_seconds(connect_timeout))
        self.store.set(HELLO, "1")

    def open(self, backend: str, device: str = "cpu", idle_timeout: float = 365 * 24 * 3600.0) -> Channel:
        """Say ready and join. The worker waits for its engine as long as the engine lives (between
        requests it may idle for hours); the engine's exit closes the socket, which ends any wait."""
        self.store.set(READY, "1")
        return Channel(self.store, _group(backend, self.store, WORKER, idle_timeout), ENGINE, device)
