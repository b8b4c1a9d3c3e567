"""A slot-addressed KV cache.

Each batch row owns `capacity` slots per layer. A token's K/V goes to the slot the caller names;
for plain decoding the slot is the token's position, so rolling back after a rejection is just
lowering `lengths` (stale slots beyond a query's position are masked out and later overwritten).
Draft branches write to slots past the shared prefix and see the prefix through an explicit mask,
which is how many branches share one prefix without copying it.
"""

from __future__ import annotations

import torch


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Store k, v ([B, H, T, D]) at `slots` ([B, T]) of one layer's caches ([B, H, C, D])."""
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache[rows, :, slots] = k.transpose(1, 2)  # advanced indices first: [B, T, H, D]
    v_cache[rows, :, slots] = v.transpose(1, 2)


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # committed tokens per row

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def ensure_capacity(self, needed: int) -> None:
        """Grow every row to hold at least `needed` slots (amortised doubling)."""
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity)
        pad = list(self.k.shape)
        pad[3] = new - self.capacity
        self.k = torch.cat([self.k, self.k.new_zeros(pad)], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(pad)], dim=3)

    @staticmethod
    def join(caches: list["KVCache"]) -> "KVCache":
        """One cache holding the rows of `caches` in order, as wide as the widest, each row copied once
        (extending one cache by each in turn copies the rows already joined again every time)."""
        if len(caches) == 1:
            return caches[0]
        shape = list(caches[0].k.shape)
        shape[1], shape[3] = sum(c.batch for c in caches), max(c.capacity for c in caches)
        out = KVCache.__new__(KVCache)
        out.k, out.v = caches[0].k.new_zeros(shape), caches[0].v.new_zeros(shape)
        row = 0
        for c in caches:
            out.k[:, row: row + c.batch, :, : c.capacity] = c.k
            out.v[:, row: row + c.batch, :, : c.capacity] = c.v
            row += c.batch
        out.lengths = torch.cat([c.lengths for c in caches])
        return out

    def truncate(self, row: int, length: int) -> None:
        self.lengths[row] = min(int(self.lengths[row]), length)

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows, in this order (sequences leaving or reordering)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        self.k, self.v, self.lengths = self.k[:, idx], self.v[:, idx], self.lengths[idx]

    def take_rows(self, rows: list[int]) -> "KVCache":
        """A separate cache holding copies of some rows (to run just those rows)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v, out.lengths = self.k[:, rows].clone(), self.v[:, rows].clone(), self.lengths[rows].clone()
        return out

    def put_rows(self, rows: list[int], other: "KVCache") -> None:
        """Write back rows taken with take_rows (possibly grown since)."""
        self.ensure_capacity(other.capacity)
        self.k[:, rows, :, : other.capacity] = other.k
        self.v[:, rows, :, : other.capacity] = other.v
        self.lengths[rows] = other.lengths

    def extend(self, other: "KVCache") -> None:
        """Append another cache's rows after ours (sequences joining a running batch)."""
        joined = KVCache.join([self, other])
        self.k, self.v, self.lengths = joined.k, joined.v, joined.lengths
