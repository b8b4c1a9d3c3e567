"""Distillation: train the draft to match the target's top-k next-token distribution.

Two kinds of teacher data: the generating teacher's shards (top-k logits only; `distill_loss`, the
soft cross-entropy renormalised on the draft's head) and teacher-forced shards (`forced.py`: top-k
log-probabilities plus the mass outside them; `tail_loss`, which also matches that tail). A run
trains on one kind; teacher-forced corpora are mixed by per-corpus weights.

Resumable: the training state (fp32 weights, optimizer moments, step) is saved under the state
directory every few minutes; a restart continues from it. Batches are drawn by a generator seeded
with (seed, step), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saguaro.distill.forced import is_forced_file, read_index, read_labels
from saguaro.distill.teacher import read_shard, shard_paths
from saguaro.models.transformer import CausalLM

log = logging.getLogger(__name__)


def target_to_draft_index(output_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """index[t] = row of target token t in the draft head, or -1 if the draft cannot emit t."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[output_ids] = torch.arange(len(output_ids))
    return index


def distill_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                 weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy from the teacher's top-k (renormalised on tokens the draft can emit)."""
    draft_ids = index[topk_ids.long()]
    teacher = torch.softmax(topk_logits.float().clamp_min(-1e4), -1) * (draft_ids >= 0)  # no -inf: NaN grads
    teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-9)
    logq = F.log_softmax(logits.float(), -1).gather(-1, draft_ids.clamp_min(0))
    per_pos = -(teacher * logq).sum(-1)
    per_pos = torch.where(weight > 0, per_pos, 0.0)  # unlabelled positions may hold -inf logits
    return (per_pos * weight).sum() / weight.sum().clamp_min(1)


def teacher_buckets(topk_ids: torch.Tensor, topk_probs: torch.Tensor, outside: torch.Tensor,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's distribution over the draft's buckets: its top-k tokens in the draft head, and "the rest".

    Returns draft rows of the top-k (-1: not in the head, or padding id -1), their probabilities (0 where
    not in the head) and the rest's probability: the mass outside the top-k plus top-k tokens the draft
    cannot emit. Normalised to sum to 1 (float16 storage leaves it off by ~1e-3).
    """
    ids = topk_ids.long()
    draft_ids = torch.where(ids >= 0, index[ids.clamp_min(0)], -1)
    in_head = draft_ids >= 0
    p_in = torch.where(in_head, topk_probs, 0.0)
    p_rest = outside + torch.where(in_head, 0.0, topk_probs).sum(-1)
    total = (p_in.sum(-1) + p_rest).clamp_min(1e-9)
    return draft_ids, p_in / total[..., None], p_rest / total


def tail_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor, outside: torch.Tensor,
              weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """KL(teacher || draft) over the buckets of `teacher_buckets`, averaged over labelled positions.

    The draft's "rest" is its mass on head tokens outside the teacher's top-k (it has none off its head),
    so the draft is taught to leave the teacher's tail mass there instead of piling it onto the top-k.
    Zero exactly when the draft matches the teacher bucket for bucket.
    """
    draft_ids, p_in, p_rest = teacher_buckets(topk_ids, topk_probs, outside, index)
    logq = F.log_softmax(logits.float(), -1)
    head = logq.shape[-1]
    slot = torch.where(draft_ids >= 0, draft_ids, head)  # column `head` is a dummy for non-head ids
    taken = torch.zeros(*logq.shape[:-1], head + 1, dtype=torch.bool, device=logq.device)
    taken = taken.scatter(-1, slot, True)[..., :head]
    has_rest = ~taken.all(-1)  # a head no wider than k can have no "rest"
    p_rest = torch.where(has_rest, p_rest, 0.0)
    logq_rest = torch.logsumexp(logq.masked_fill(taken, -1e4), -1)  # finite: no NaN gradients
    logq_in = logq.gather(-1, draft_ids.clamp_min(0))
    per_pos = (torch.special.xlogy(p_in, p_in) - p_in * logq_in).sum(-1)
    per_pos = per_pos + torch.special.xlogy(p_rest, p_rest) - p_rest * logq_rest
    per_pos = torch.where(weight > 0, per_pos, 0.0)
    return (per_pos * weight).sum() / weight.sum().clamp_min(1)


def tv_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor, outside: torch.Tensor,
            weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Total variation between teacher and draft over the buckets of `teacher_buckets`, averaged over labelled
    positions: 1 minus the acceptance of a drafted token at T = 1 as far as the buckets resolve it, so
    minimising it raises what sampled speculation keeps (the KL losses raise it only on the way to a match)."""
    draft_ids, p_in, p_rest = teacher_buckets(topk_ids, topk_probs, outside, index)
    q = torch.softmax(logits.float(), -1)
    q_in = torch.where(draft_ids >= 0, q.gather(-1, draft_ids.clamp_min(0)), 0.0)
    q_rest = (1.0 - q_in.sum(-1)).clamp_min(0.0)
    per_pos = 0.5 * ((p_in - q_in).abs().sum(-1) + (p_rest - q_rest).abs())
    per_pos = torch.where(weight > 0, per_pos, 0.0)
    return (per_pos * weight).sum() / weight.sum().clamp_min(1)


def topk_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor, outside: torch.Tensor,
              weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`distill_loss` (the generated shards' loss) over teacher-forced labels: the stored top-k renormalised
    on the head, the outside mass left out. Padding ids (-1) have probability 0, so they weigh nothing."""
    return distill_loss(logits, topk_ids.clamp_min(0), topk_probs.log(), weight, index)


# the losses a run on teacher-forced shards may take (`--loss`), all of (logits, ids, probs, outside, weight, index)
FORCED_LOSSES = {"tail": tail_loss, "topk": topk_loss, "tv": tv_loss}


def make_batch(shards: list[dict[str, torch.Tensor]], rows: list[tuple[int, int]], max_len: int):
    """Right-padded tokens plus per-position teacher targets and loss weights for some shard rows."""
    width = min(max_len, max(int(shards[s]["ends"][r]) for s, r in rows))
    n = len(rows)
    k = shards[0]["topk_ids"].shape[-1]
    tokens = torch.zeros(n, width, dtype=torch.long)
    ids = torch.zeros(n, width, k, dtype=torch.int32)
    logits = torch.full((n, width, k), -1e4, dtype=torch.float16)
    weight = torch.zeros(n, width)
    for i, (s, r) in enumerate(rows):
        sh = shards[s]
        end = min(int(sh["ends"][r]), width)
        tokens[i, :end] = sh["tokens"][r, :end].long()
        ids[i, :end] = sh["topk_ids"][r, :end]
        logits[i, :end] = sh["topk_logits"][r, :end]
        first = int(sh["prompt_lengths"][r]) - 1  # the teacher's labels start at the last prompt token
        weight[i, first : end - 1] = 1.0
    return tokens, ids, logits, weight


def make_forced_batch(shards: list[dict[str, torch.Tensor]], files: list[Path], rows: list[tuple[int, int]],
                      max_len: int):
    """Like `make_batch` for teacher-forced shards: tokens, top-k ids (-1: padding), top-k probabilities,
    outside mass and loss weights. Label rows are read from the shard files."""
    width = min(max_len, max(int(shards[s]["ends"][r]) for s, r in rows))
    k = max(int(shards[s]["k"]) for s, _ in rows)
    n = len(rows)
    tokens = torch.zeros(n, width, dtype=torch.long)
    ids = torch.full((n, width, k), -1, dtype=torch.int32)
    probs = torch.zeros(n, width, k)
    outside = torch.zeros(n, width)
    weight = torch.zeros(n, width)
    for i, (s, r) in enumerate(rows):
        sh = shards[s]
        end = min(int(sh["ends"][r]), width)
        tokens[i, :end] = sh["tokens"][r, :end].long()
        first = int(sh["prompt_lengths"][r]) - 1
        count = max(0, end - 1 - first)
        if count == 0:
            continue
        start = int(sh["label_offsets"][r])
        top_ids, top_lp, out = read_labels(files[s], start, start + count)
        ids[i, first : first + count, : top_ids.shape[-1]] = top_ids
        probs[i, first : first + count, : top_ids.shape[-1]] = top_lp.float().exp()
        outside[i, first : first + count] = out
        weight[i, first : first + count] = 1.0
    return tokens, ids, probs, outside, weight


def row_lengths(shards: list[dict[str, torch.Tensor]], rows: list[tuple[int, int]], width: int) -> list[int]:
    """Real tokens of each row in a batch padded (or cut) to `width`, as `make_batch` lays them out."""
    return [min(int(shards[s]["ends"][r]), width) for s, r in rows]


def pack_rows(tokens: torch.Tensor, lengths: list[int], weight: torch.Tensor):
    """A right-padded batch (tokens [n, width], row i real up to lengths[i], labels where weight > 0) as one
    packed row: (tokens [1, sum(lengths)], packed index of each labelled position [M], the [n, width] bool
    that picks the same positions, in the same order, out of the padded label tensors)."""
    width = tokens.shape[1]
    real = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    labelled = (weight > 0) & real
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    wanted = (starts[:, None] + torch.arange(width)[None])[labelled]
    return tokens[real][None], wanted, labelled


class Trainer:
    def __init__(self, draft: CausalLM, data_dir: Path | dict[Path, float], state_dir: Path, seed: int,
                 lr: float = 5e-4, batch_size: int = 8, max_len: int = 640, warmup: int = 100, bf16: bool = False,
                 loss: str = "tail"):
        """data_dir: one shard directory, or several with the weight of each in the batches (their mix).
        bf16: run forward and backward under bfloat16 autocast; weights, gradients and Adam stay float32.
        loss: which of `FORCED_LOSSES` trains on teacher-forced data (generated shards take `distill_loss`)."""
        if loss not in FORCED_LOSSES:
            raise ValueError(f"loss must be one of {tuple(FORCED_LOSSES)}, got {loss!r}")
        self.loss = loss
        self.sources = dict(data_dir) if isinstance(data_dir, dict) else {data_dir: 1.0}
        self.draft, self.state_dir = draft, state_dir
        self.seed, self.lr, self.batch_size, self.max_len, self.warmup = seed, lr, batch_size, max_len, warmup
        self.bf16 = bf16
        self.params = [p for n, p in draft.named_parameters() if not n.startswith("embed.")]
        draft.embed.weight.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.index = target_to_draft_index(draft.output_token_ids, draft.config.vocab_size)
        self.step, self.tokens_seen = 0, 0
        self.warmup_from = 0  # fresh optimizer moments warm up again from this step
        self.wall_s = 0.0  # training wall time, summed over resumed runs
        # (first step, steps): the learning rate falls linearly to zero over these steps, and the run ends there
        self.anneal: tuple[int, int] | None = None
        self._shards: list[dict[str, torch.Tensor]] = []
        self._shard_files: list[Path] = []
        self._shard_source: list[int] = []  # which of self.sources each shard came from
        self.forced: bool | None = None  # the kind of the data, known once a shard is read

    # ------------------------------------------------------------------ state
    def save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{n}": p.detach() for n, p in self.draft.named_parameters() if not n.startswith("embed.")}
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p)
            if st:
                tensors[f"adam.{i}.exp_avg"] = st["exp_avg"]
                tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"]
                tensors[f"adam.{i}.step"] = st["step"].reshape(1).float()
        tmp = self.state_dir / "train_state.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.rename(self.state_dir / "train_state.safetensors")
        (self.state_dir / "train_state.json").write_text(
            json.dumps({"step": self.step, "tokens_seen": self.tokens_seen, "seed": self.seed,
                        "wall_s": self.wall_s, "anneal": self.anneal}))

    def load_state(self, state_dir: Path | None = None) -> bool:
        """Resume from this run's saved state, or from another run's in `state_dir` (an anneal's start)."""
        state_dir = state_dir or self.state_dir
        f = state_dir / "train_state.safetensors"
        if not f.is_file():
            return False
        tensors = load_file(str(f))
        named = dict(self.draft.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith("param."):
                    named[k.removeprefix("param.")].copy_(v)
        for i, p in enumerate(self.params):
            if f"adam.{i}.exp_avg" in tensors:
                self.opt.state[p] = {"exp_avg": tensors[f"adam.{i}.exp_avg"],
                                     "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"],
                                     "step": tensors[f"adam.{i}.step"][0].clone()}
        meta = json.loads((state_dir / "train_state.json").read_text())
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.wall_s = meta.get("wall_s", 0.0)
        self.anneal = tuple(meta["anneal"]) if meta.get("anneal") else None
        return True

    # ------------------------------------------------------------------ data
    def teacher_tokens(self) -> int:
        """Labelled positions in the teacher data read so far (the data size)."""
        return sum(int((sh["ends"] - sh["prompt_lengths"]).sum()) for sh in self._shards)

    def refresh_shards(self) -> int:
        """Pick up shards the teacher wrote since last time; return how many rows there are."""
        known = set(self._shard_files)
        for source, data_dir in enumerate(self.sources):
            for path in shard_paths(data_dir):
                if path not in known:
                    self._add_shard(path, source)
        return sum(s["tokens"].shape[0] for s in self._shards)

    def _add_shard(self, path: Path, source: int) -> None:
        forced = is_forced_file(path)
        if self.forced is not None and forced != self.forced:
            raise ValueError(f"{path}: teacher-forced and generated shards cannot be mixed in one run")
        self.forced = forced
        self._shard_files.append(path)
        self._shard_source.append(source)
        self._shards.append(read_index(path) if forced else read_shard(path))

    def next_rows(self) -> list[tuple[int, int]]:
        """Batch `step`'s rows: uniform over all rows of one source; with several, a source by weight first."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        pools: dict[int, list[tuple[int, int]]] = {}
        for s, sh in enumerate(self._shards):
            pools.setdefault(self._shard_source[s], []).extend((s, r) for r in range(sh["tokens"].shape[0]))
        pools = {src: rows for src, rows in sorted(pools.items()) if rows}
        if len(pools) == 1:
            pool = next(iter(pools.values()))
            return [pool[i] for i in torch.randint(len(pool), (self.batch_size,), generator=g).tolist()]
        weights = list(self.sources.values())
        chosen = list(pools)
        w = torch.tensor([weights[src] for src in chosen], dtype=torch.float64)
        picks = torch.multinomial(w, self.batch_size, replacement=True, generator=g).tolist()
        rows = []
        for i in picks:
            pool = pools[chosen[i]]
            rows.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        return rows

    def data_exhausted(self, start_tokens: int, max_epochs: float | None) -> bool:
        return max_epochs is not None and self.tokens_seen - start_tokens >= max_epochs * self.teacher_tokens()

    # ------------------------------------------------------------------ loop
    def next_batch(self):
        """This step's loss weights, the draft's forward on its inputs, and the loss of that forward's output
        (by the data's kind). The rows are packed end to end, and the head runs only where a label is: the
        loss is the padded batch's, for about half the compute (`pack_rows`)."""
        rows = self.next_rows()
        if self.forced:
            tokens, ids, probs, outside, weight = make_forced_batch(self._shards, self._shard_files, rows,
                                                                    self.max_len)
        else:
            tokens, ids, logits, weight = make_batch(self._shards, rows, self.max_len)
        lengths = row_lengths(self._shards, rows, tokens.shape[1])
        packed, wanted, labelled = pack_rows(tokens, lengths, weight)

        def forward(m):
            return m.forward_train(packed, tuple(lengths), wanted)

        if self.forced:
            loss = FORCED_LOSSES[self.loss]
            return weight, forward, lambda out: loss(
                out.float(), ids[labelled], probs[labelled], outside[labelled], weight[labelled], self.index)
        return weight, forward, lambda out: distill_loss(
            out.float(), ids[labelled], logits[labelled], weight[labelled], self.index)

    def lr_at(self, step: int) -> float:
        """Warm-up from `warmup_from`, then constant; under an anneal, falling linearly to zero at its end
        (the step past the last gets lr 0, so the last step taken moves the weights a little)."""
        lr = self.lr * min(1.0, (step + 1 - self.warmup_from) / self.warmup)
        if self.anneal is not None:
            first, steps = self.anneal
            lr *= max(0.0, 1.0 - (step - first + 1) / (steps + 1))
        return lr

    def annealed(self) -> bool:
        return self.anneal is not None and self.step >= self.anneal[0] + self.anneal[1]

    def train_step(self) -> float:
        weight, forward, loss_of = self.next_batch()
        lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.draft.train()
        with torch.autocast(weight.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = forward(self.draft)
        loss = loss_of(out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        self.tokens_seen += int(weight.sum())
        return loss.item()

    def run(self, max_tokens: int, save_every_s: float = 300.0, on_step=None,
            max_epochs: float | None = None) -> None:
        """Train until max_tokens. max_epochs: wait for the teacher's next shard whenever this run has
        trained on max_epochs times the teacher tokens there are (a fast trainer would overfit them)."""
        last_save, start = time.monotonic(), self.tokens_seen
        self.stop_requested = False
        restore = None
        if threading.current_thread() is threading.main_thread():
            # `kill PID` (SIGTERM) ends the run at the next step boundary with its state saved, so a run
            # stopped at the end of a session resumes exactly where it was, not at its last 5-minute save
            restore = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_requested", True))
        try:
            self._run(max_tokens, save_every_s, on_step, max_epochs, start, last_save)
        finally:
            if restore is not None:
                signal.signal(signal.SIGTERM, restore)
        self.save_state()

    def _run(self, max_tokens, save_every_s, on_step, max_epochs, start, last_save) -> None:
        while self.tokens_seen < max_tokens and not self.stop_requested and not self.annealed():
            rows = self.refresh_shards()
            if rows == 0 or self.data_exhausted(start, max_epochs):
                time.sleep(10)
                continue
            t = time.monotonic()
            loss = self.train_step()
            self.wall_s += time.monotonic() - t
            if on_step is not None:
                on_step(self, loss)
            if time.monotonic() - last_save > save_every_s:
                self.save_state()
                last_save = time.monotonic()
        if self.stop_requested:
            log.info("stopping at step %d (SIGTERM); saving its state", self.step)
