"""Typed messages between the engine and the draft worker, sent over their private channel.

Every message travels as one int64 frame (a header [kind, #ints, #floats, #tensor elements, ...],
then the ints and the floats' bit patterns), an overflow when they do not fit, and (for
speculations with q) one float tensor. Each message class says how it packs into ints, floats and
that tensor, so nothing is pickled and no integer on the wire goes unnamed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

import torch


class Kind(IntEnum):
    PREFILL = 1
    RESPOND = 2
    RETIRE = 3
    SHUTDOWN = 4
    SPECULATIONS = 5
    READY = 6
    HELLO = 7


class Fallback(IntEnum):
    NEURAL = 0
    NGRAM = 1
    NONE = 2


class RowFlag(IntFlag):
    """Per row of a Speculations message: was the outcome in the cache, did prompt lookup serve it."""

    CACHED = 1
    LOOKUP = 2


DTYPES = ("float32", "float64", "bfloat16", "float16")  # a Hello's dtype travels as its index here
PROTOCOL = 1  # a Hello's version: a worker refuses an engine that speaks another

NO_OUTCOME = -1  # "this row has no outcome yet" (its first round after prefill)
NO_SEED = -1


def _ragged(lists: list[list[int]]) -> list[int]:
    return [len(lists)] + [len(x) for x in lists] + [v for x in lists for v in x]


def _unragged(ints: list[int], at: int) -> tuple[list[list[int]], int]:
    n = ints[at]
    lengths = ints[at + 1 : at + 1 + n]
    at += 1 + n
    out = []
    for length in lengths:
        out.append(ints[at : at + length])
        at += length
    return out, at


@dataclass
class Prefill:
    seq_ids: list[int]
    prompts: list[list[int]]
    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    seeds: list[int | None]
    kind = Kind.PREFILL

    def pack(self):
        seeds = [NO_SEED if s is None else s for s in self.seeds]
        return self.seq_ids + seeds + self.top_ks + _ragged(self.prompts), self.temperatures + self.top_ps, None

    @classmethod
    def unpack(cls, ints, floats, tensor):
        n = (len(floats)) // 2
        seq_ids, seeds, top_ks = ints[:n], ints[n : 2 * n], ints[2 * n : 3 * n]
        prompts, _ = _unragged(ints, 3 * n)
        return cls(seq_ids, prompts, floats[:n], floats[n:], top_ks, [None if s == NO_SEED else s for s in seeds])


@dataclass
class Respond:
    """Answer these outcomes now (misses with `fallback`, greedy rows repeating their last
    `lookup_min_match` tokens by prompt lookup), then build the next tree with `fanout`."""

    outcomes: list[tuple[int, int] | None]  # per row: (accepted, emitted token) of its last round
    new_tokens: list[list[int]]  # per row: context tokens the worker has not seen
    fanout: list[int]
    fallback: str = "neural"
    lookup_min_match: int = 0  # 0: no prompt lookup ahead of the cache
    kind = Kind.RESPOND

    def pack(self):
        flat = [v for o in self.outcomes for v in ((NO_OUTCOME, NO_OUTCOME) if o is None else o)]
        head = [int(Fallback[self.fallback.upper()]), self.lookup_min_match, len(self.fanout)] + self.fanout
        return head + [len(self.outcomes)] + flat + _ragged(self.new_tokens), [], None

    @classmethod
    def unpack(cls, ints, floats, tensor):
        fallback, lookup_min_match, nf = Fallback(ints[0]).name.lower(), ints[1], ints[2]
        fanout, at = ints[3 : 3 + nf], 3 + nf
        n = ints[at]
        pairs = [tuple(ints[at + 1 + 2 * i : at + 3 + 2 * i]) for i in range(n)]
        rows, _ = _unragged(ints, at + 1 + 2 * n)
        return cls([None if p[0] == NO_OUTCOME else p for p in pairs], rows, fanout, fallback, lookup_min_match)


@dataclass
class Retire:
    keep: list[int]
    kind = Kind.RETIRE

    def pack(self):
        return list(self.keep), [], None

    @classmethod
    def unpack(cls, ints, floats, tensor):
        return cls(ints)


@dataclass
class Shutdown:
    kind = Kind.SHUTDOWN

    def pack(self):
        return [], [], None

    @classmethod
    def unpack(cls, ints, floats, tensor):
        return cls()


@dataclass
class Ready:
    """The worker has loaded its draft; `k` and the draft's output vocabulary confirm the setup."""

    k: int
    head_vocab: int
    kind = Kind.READY

    def pack(self):
        return [self.k, self.head_vocab], [], None

    @classmethod
    def unpack(cls, ints, floats, tensor):
        return cls(ints[0], ints[1])


@dataclass
class Hello:
    """An engine's settings for a worker it attaches to by address (saguaro draft-worker --listen),
    which knows only its checkpoints. It travels through the store, before the channel exists.

    vocab: the engine's target vocabulary (a worker with another target refuses);
    host: the worker's address as the engine reaches it (the worker's end of the channel binds there)."""

    k: int
    fanout: list[int]
    vocab: int
    dtype: str = "float32"
    c: float = 1.0
    fallback: str = "neural"
    host: str = "127.0.0.1"
    protocol: int = PROTOCOL
    kind = Kind.HELLO

    def pack(self):
        head = [self.protocol, self.k, self.vocab, DTYPES.index(self.dtype), int(Fallback[self.fallback.upper()])]
        return head + _ragged([self.fanout, list(self.host.encode())]), [float(self.c)], None

    @classmethod
    def unpack(cls, ints, floats, tensor):
        protocol, k, vocab, dtype, fallback = ints[:5]
        (fanout, host), _ = _unragged(ints, 5)
        return cls(k, fanout, vocab, DTYPES[dtype], floats[0], Fallback(fallback).name.lower(), bytes(host).decode(),
                   protocol)


@dataclass
class Speculations:
    """Each row's next K tokens, whether they came from the cache, and q where rows sample.

    q travels over the draft head's vocabulary ([rows, K, head_vocab]); greedy rows send none.
    tree_s is how long the worker spent on the tree these hits came from, fallback_s on the misses.
    """

    tokens: list[list[int]]
    hits: list[bool]
    sampled_rows: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # [len(sampled_rows), K, head_vocab]
    tree_s: float = 0.0
    fallback_s: float = 0.0
    lookups: list[bool] = field(default_factory=list)  # rows served by prompt lookup (empty: none)
    kind = Kind.SPECULATIONS

    def pack(self):
        k = len(self.tokens[0]) if self.tokens else 0
        lookups = self.lookups or [False] * len(self.tokens)
        flags = [int(RowFlag.CACHED * h | RowFlag.LOOKUP * lk) for h, lk in zip(self.hits, lookups)]
        ints = [len(self.tokens), k] + [t for row in self.tokens for t in row] + flags
        return ints + self.sampled_rows, [float(self.tree_s), float(self.fallback_s)], self.q

    @classmethod
    def unpack(cls, ints, floats, tensor):
        n, k = ints[0], ints[1]
        body = ints[2 : 2 + n * k]
        tokens = [body[i * k : (i + 1) * k] for i in range(n)]
        flags = [RowFlag(f) for f in ints[2 + n * k : 2 + n * k + n]]
        return cls(tokens, [RowFlag.CACHED in f for f in flags], ints[2 + n * k + n :], tensor, floats[0],
                   floats[1], [RowFlag.LOOKUP in f for f in flags])


MESSAGES = {m.kind: m for m in (Prefill, Respond, Retire, Shutdown, Ready, Speculations, Hello)}
STORE_HEADER = struct.Struct("<3q")  # kind, #ints, #floats of a message kept in the store


def to_bytes(message) -> bytes:
    """A message without a tensor as bytes for the store (kind, counts, ints, float64s; no pickle)."""
    ints, floats, tensor = message.pack()
    if tensor is not None:
        raise ValueError(f"{type(message).__name__} carries a tensor: it travels on the channel")
    return STORE_HEADER.pack(int(message.kind), len(ints), len(floats)) + struct.pack(
        f"<{len(ints)}q{len(floats)}d", *ints, *floats)


def from_bytes(data: bytes):
    kind, n_ints, n_floats = STORE_HEADER.unpack_from(data)
    values = struct.unpack_from(f"<{n_ints}q{n_floats}d", data, STORE_HEADER.size)
    return MESSAGES[Kind(kind)].unpack(list(values[:n_ints]), list(values[n_ints:]), None)


TENSOR_DTYPES = [torch.float32, torch.float64]  # q travels in the draft's own precision
HEADER = 10  # kind, #ints, #floats, #tensor elements, tensor ndim, tensor dtype index, shape (4)
FRAME = 1024  # int64s per frame: the header, then ints and float64 bit patterns; the rest follows apart


def _frame_payload(ints: list[int], floats: list[float]) -> torch.Tensor:
    bits = torch.tensor(floats, dtype=torch.float64).view(torch.int64)
    return torch.cat([torch.tensor(ints, dtype=torch.int64), bits])


def send(message, channel) -> None:
    """Send over a `channel.Channel` (the engine's or the worker's end of one private link).

    Every point-to-point send waits for the matching receive, so a message is as few sends as it
    can be: one frame when ints and floats fit in it (every message of a small batch), an overflow
    send when they do not, and q when a row samples."""
    ints, floats, tensor = message.pack()
    numel = 0 if tensor is None else tensor.numel()
    shape = [] if tensor is None else list(tensor.shape)
    dtype = 0 if tensor is None or tensor.dtype != torch.float64 else 1
    header = torch.tensor([int(message.kind), len(ints), len(floats), numel, len(shape), dtype]
                          + shape + [0] * (4 - len(shape)), dtype=torch.int64)
    payload = _frame_payload(ints, floats)
    frame = torch.zeros(FRAME, dtype=torch.int64)
    fits = min(len(payload), FRAME - HEADER)
    frame[:HEADER], frame[HEADER : HEADER + fits] = header, payload[:fits]
    channel.send(frame)
    if len(payload) > fits:
        channel.send(payload[fits:])
    if numel:
        channel.send(tensor.detach().to(dtype=TENSOR_DTYPES[dtype]))


def recv(channel):
    device = channel.device
    frame = channel.recv(torch.zeros(FRAME, dtype=torch.int64, device=device)).cpu()
    kind, n_ints, n_floats, numel, ndim, dtype = frame[:6].tolist()
    shape = frame[6 : 6 + ndim].tolist()
    size = n_ints + n_floats
    payload = frame[HEADER : HEADER + min(size, FRAME - HEADER)]
    if size > FRAME - HEADER:
        rest = channel.recv(torch.zeros(size - (FRAME - HEADER), dtype=torch.int64, device=device))
        payload = torch.cat([payload, rest.cpu()])
    ints = payload[:n_ints].tolist()
    floats = payload[n_ints:].view(torch.float64).tolist()
    tensor = None
    if numel:
        tensor = channel.recv(torch.zeros(shape, dtype=TENSOR_DTYPES[dtype], device=device)).cpu()
    return MESSAGES[Kind(kind)].unpack(ints, floats, tensor)
