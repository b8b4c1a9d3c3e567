"""A private link between one engine and its draft worker: its own TCPStore and process group.

Never the default process group, so any number of engines (each with its worker) live in one
process, and closing one never touches another's. The engine end is the store's master (on a port
the OS picks); the worker connects, says "hello", loads its draft, says "ready", and only then do
both ends build the group, so the engine can watch the child process (poll) the whole time it
waits instead of sitting in a rendezvous that only a timeout ends.

A worker started by hand (`saguaro draft-worker --listen HOST:PORT`) turns this around: it owns
the store (Listener) and engines connect to it (Attach), one at a time. Each engine takes a
numbered turn (an atomic counter in the store) and talks under the prefix "<turn>/", so what one
session leaves in the store never meets the next. In its turn the worker writes a fresh nonce; the
engine answers with HMAC-SHA256(token, nonce) and its settings (a wire.Hello); the worker compares
the proof before reading anything else and answers "accept" or "refused: why". Only after
"accept" do the two build their process group. The token itself never crosses the network, and
what a store client can read (nonces, proofs of other sessions) cannot be replayed.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENGINE, WORKER = 0, 1
HELLO, READY = "hello", "ready"
POLL_S = 0.02  # how often the engine looks at the child and the store while it waits
IDLE_POLL_S = 0.1  # how often a listening worker looks for the next engine
IDLE_S = 365 * 24 * 3600.0  # a worker waits for its engine's next message as long as the engine lives
TAG = 0

# Keys of the attach handshake (each under its turn's prefix), and the answers.
TURNS, NONCE, HELLO_MSG, PROOF, ANSWER = "turns", "nonce", "hello", "proof", "answer"
ACCEPT, GONE, REFUSED = "accept", "gone", "refused: "
TOKEN_ENV = "SAGUARO_WORKER_TOKEN"


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


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def proof(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def _gloo_at(store, rank: int, hostname: str, timeout: float):
    """A gloo group whose end here listens on `hostname` (an address the peer can reach)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _seconds(timeout)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=hostname)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def _local_address(host: str, port: int) -> str:
    """This machine's address on the route to host (no packet is sent)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def _wait_key(store, keys: list[str], deadline_s: float) -> str | None:
    """The first of `keys` that the store holds within deadline_s, else None."""
    end = time.monotonic() + deadline_s
    while True:
        found = next((k for k in keys if store.check([k])), None)
        if found is not None or time.monotonic() > end:
            return found
        time.sleep(POLL_S)


def _listening_socket(host: str, port: int) -> int:
    """A socket listening on host:port alone, for the store to serve on (a TCPStore's own server
    would listen on every interface, whatever host it is given)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock.detach()  # the store owns it from here


def _first_line(e: Exception) -> str:
    """torch.distributed errors run to many lines (C++ frames); the first says what happened."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Refused(ChannelError):
    """The worker answered, and refused this engine (wrong token, another target, ...)."""


class Attach:
    """An engine's side of a worker it reaches by address: take a turn, prove the token, join."""

    def __init__(self, host: str, port: int, connect_s: float):
        self.host, self.port = host, port
        try:
            root = dist.TCPStore(host, port, None, False, timeout=_seconds(connect_s))
            turn = root.add(TURNS, 1)
        except Exception as e:  # no listener there (refused, timed out, unresolvable)
            raise ChannelError(f"no draft worker at {host}:{port}: {_first_line(e)}") from None
        self.store = dist.PrefixStore(f"turn{turn}", root)

    def handshake(self, token: str, hello: bytes, deadline_s: float) -> None:
        """Wait for our turn (a worker serves one engine at a time), then prove the token; raise
        Refused with the worker's reason, ChannelError when it is busy or silent."""
        if not _wait_key(self.store, [NONCE], deadline_s):
            self._give_up(f"draft worker at {self.host}:{self.port} is serving another engine "
                          f"(no turn within {deadline_s:.0f} s)")
        nonce = self.store.get(NONCE).decode()
        self.store.set(HELLO_MSG, hello)
        self.store.set(PROOF, proof(token, nonce))
        if not _wait_key(self.store, [ANSWER], deadline_s):
            self._give_up(f"draft worker at {self.host}:{self.port} did not answer within {deadline_s:.0f} s")
        answer = self.store.get(ANSWER).decode()
        if answer.startswith(REFUSED):
            raise Refused(f"draft worker at {self.host}:{self.port} refused this engine: "
                          f"{answer.removeprefix(REFUSED)}")

    def _give_up(self, why: str) -> None:
        """Tell the worker not to serve this turn; it may have accepted in the meantime."""
        if self.store.compare_set(ANSWER, "", GONE).decode() != ACCEPT:
            raise ChannelError(why)

    def open(self, timeout: float) -> Channel:
        hostname = _local_address(self.host, self.port)
        try:
            group = _gloo_at(self.store, ENGINE, hostname, timeout)
        except Exception as e:
            raise ChannelError(f"draft worker at {self.host}:{self.port} did not join: {_first_line(e)}") from None
        return Channel(self.store, group, WORKER)


@dataclass
class Turn:
    """One engine's turn at a listening worker, its token proven; the worker accepts or refuses."""

    store: object  # the turn's PrefixStore
    hello: bytes

    def refuse(self, why: str) -> None:
        self.store.compare_set(ANSWER, "", REFUSED + why)

    def accept(self, hostname: str) -> Channel | None:
        """The channel to this engine; None if it gave up waiting. Its waits are bounded by IDLE_S
        (an engine may idle for hours between requests; its exit closes the socket, which ends any
        wait). A group's timeout cannot be lengthened once built, so joining has the same bound."""
        if self.store.compare_set(ANSWER, "", ACCEPT).decode() != ACCEPT:
            return None
        return Channel(self.store, _gloo_at(self.store, WORKER, hostname, IDLE_S), ENGINE)


class Listener:
    """A worker's side when engines attach by address: it owns the store and serves turns in order."""

    def __init__(self, host: str, port: int, join_s: float):
        self.store = dist.TCPStore(host, port, None, True, timeout=_seconds(join_s), wait_for_workers=False,
                                   master_listen_fd=_listening_socket(host, port))
        self.join_s, self.turn = join_s, 0

    def next_turn(self, token: str) -> Turn | None:
        """Wait (as long as it takes) for the next engine; its Turn once its token is proven, None
        when it went away or proved a wrong token (refused here, before anything else is read)."""
        self.turn += 1
        while self.store.add(TURNS, 0) < self.turn:
            time.sleep(IDLE_POLL_S)
        store = dist.PrefixStore(f"turn{self.turn}", self.store)
        nonce = secrets.token_hex(16)
        store.set(NONCE, nonce)
        if _wait_key(store, [PROOF, ANSWER], self.join_s) != PROOF:  # it gave up waiting, or died
            store.compare_set(ANSWER, "", GONE)
            log.info("turn %d: the engine went away", self.turn)
            return None
        if not hmac.compare_digest(store.get(PROOF).decode(), proof(token, nonce)):
            Turn(store, b"").refuse(f"wrong token (the engine's {TOKEN_ENV} must be the worker's token)")
            log.warning("turn %d: refused an engine with a wrong token", self.turn)
            return None
        return Turn(store, store.get(HELLO_MSG))


class WorkerEnd:
    """The worker's side: connect to the engine's store, announce progress, then join the group."""

    def __init__(self, host: str, port: int, connect_timeout: float):
        self.store = dist.TCPStore(host, port, 2, False, timeout=_seconds(connect_timeout))
        self.store.set(HELLO, "1")

    def open(self, backend: str, device: str = "cpu", idle_timeout: float = IDLE_S) -> Channel:
        """Say ready and join. The worker waits for its engine as long as the engine lives (between
        requests it may idle for hours); the engine's exit closes the socket, which ends any wait."""
        self.store.set(READY, "1")
        return Channel(self.store, _group(backend, self.store, WORKER, idle_timeout), ENGINE, device)
