"""Distillation: train the draft to match the target's top-k next-token distribution.

Resumable: the training state (fp32 weights, optimizer moments, step) is saved under the state
directory every few minutes; a restart continues from it. Batches are drawn by a generator seeded
with (seed, step), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

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


class Trainer:
    def __init__(self, draft: CausalLM, data_dir: Path, state_dir: Path, seed: int, lr: float = 5e-4,
                 batch_size: int = 8, max_len: int = 640, warmup: int = 100, bf16: bool = False):
        """bf16: run forward and backward under bfloat16 autocast; weights, gradients and Adam stay float32."""
        self.draft, self.data_dir, self.state_dir = draft, data_dir, state_dir
        self.seed, self.lr, self.batch_size, self.max_len, self.warmup = seed, lr, batch_size, max_len, warmup
        self.bf16 = bf16
        self.params = [p for n, p in draft.named_parameters() if not n.startswith("embed.")]
        draft.embed.weight.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        self.index = target_to_draft_index(draft.output_token_ids, draft.config.vocab_size)
        self.step, self.tokens_seen = 0, 0
        self.warmup_from = 0  # fresh optimizer moments warm up again from this step
        self.wall_s = 0.0  # training wall time, summed over resumed runs
        self._shards: list[dict[str, torch.Tensor]] = []
        self._shard_files: list[Path] = []

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
                        "wall_s": self.wall_s}))

    def load_state(self) -> bool:
        f = self.state_dir / "train_state.safetensors"
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
        meta = json.loads((self.state_dir / "train_state.json").read_text())
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.wall_s = meta.get("wall_s", 0.0)
        return True

    # ------------------------------------------------------------------ data
    def teacher_tokens(self) -> int:
        """Labelled positions in the teacher data read so far (the data size)."""
        return sum(int((sh["ends"] - sh["prompt_lengths"]).sum()) for sh in self._shards)

    def refresh_shards(self) -> int:
        """Pick up shards the teacher wrote since last time; return how many rows there are."""
        for path in shard_paths(self.data_dir):
            if path not in self._shard_files:
                self._shard_files.append(path)
                self._shards.append(read_shard(path))
        return sum(s["tokens"].shape[0] for s in self._shards)

    def next_rows(self) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        pool = [(s, r) for s, sh in enumerate(self._shards) for r in range(sh["tokens"].shape[0])]
        picks = torch.randint(len(pool), (self.batch_size,), generator=g).tolist()
        return [pool[i] for i in picks]

    def data_exhausted(self, start_tokens: int, max_epochs: float | None) -> bool:
        return max_epochs is not None and self.tokens_seen - start_tokens >= max_epochs * self.teacher_tokens()

    # ------------------------------------------------------------------ loop
    def train_step(self) -> float:
        tokens, ids, logits, weight = make_batch(self._shards, self.next_rows(), self.max_len)
        lr = self.lr * min(1.0, (self.step + 1 - self.warmup_from) / self.warmup)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.draft.train()
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.draft.forward_train(tokens)
        loss = distill_loss(out.float(), ids, logits, weight, self.index)
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
        while self.tokens_seen < max_tokens:
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
        self.save_state()
