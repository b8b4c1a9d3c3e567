"""Teacher forcing: the target scores existing text in one forward pass per sequence and keeps, at every
labelled position, its top-k log-probabilities and the probability mass outside the top-k.

One forward over a whole sequence labels all of its positions at prefill speed, where the generating
teacher (`teacher.py`) pays one decode step per label. The outside mass lets the trainer match the
target's tail as one bucket, so a draft trained on it is not over-confident when sampling at T > 0.

Shard format (safetensors, labels packed row after row, only at labelled positions):
  tokens [N, W] int32 (right-padded), ends [N], prompt_lengths [N] (labels predict tokens
  prompt_length .. end-1, i.e. sit at positions prompt_length-1 .. end-2), label_offsets [N+1],
  topk_ids [M, k] int32, topk_logprobs [M, k] float16, outside_mass [M] float32.
The metadata records the scoring wall time and token counts, so the statistics survive resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from saguaro.distill.corpora import Items, Text
from saguaro.distill.teacher import read_shard, shard_paths, write_shard
from saguaro.models.transformer import CausalLM

log = logging.getLogger(__name__)

TOP_K = 32
INDEX_KEYS = ("tokens", "ends", "prompt_lengths", "label_offsets")
LABEL_KEYS = ("topk_ids", "topk_logprobs", "outside_mass")


def is_forced_file(path: Path) -> bool:
    with safe_open(str(path), "pt") as f:
        return "label_offsets" in f.keys()


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probabilities (float16) of logits [n, V], and the mass outside them.

    The outside mass is taken from the stored (rounded) top-k, so top-k + outside sums to 1 as stored.
    """
    top = torch.topk(torch.log_softmax(logits.float(), -1), k, dim=-1)
    logprobs = top.values.half()
    outside = (1.0 - logprobs.float().exp().sum(-1)).clamp_min(0.0)
    return top.indices.int(), logprobs, outside


def pad_tokens(texts: list[Text]) -> torch.Tensor:
    out = torch.zeros(len(texts), max(len(t.tokens) for t in texts), dtype=torch.long)
    for i, t in enumerate(texts):
        out[i, : len(t.tokens)] = torch.tensor(t.tokens)
    return out


@torch.inference_mode()
def score_batch(target: CausalLM, texts: list[Text], k: int, chunk: int = 128) -> list[tuple[torch.Tensor, ...]]:
    """Per text, (ids, logprobs, outside) of the target at its labelled positions, in order.

    The batch is prefilled `chunk` positions at a time through the KV cache, so the [B, chunk, V] logits
    stay small; right padding never reaches a real position (attention is causal). The output head
    (a fifth of the work) runs only on the span of the chunk that some row labels.
    """
    tokens = pad_tokens(texts).to(target.device)
    n, width = tokens.shape
    first = torch.tensor([t.prompt_length - 1 for t in texts])
    last = torch.tensor([len(t.tokens) - 1 for t in texts])  # labelled positions: [first, last)
    cache = target.new_cache(n, width)
    parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in texts]
    for s in range(0, width, chunk):
        e = min(s + chunk, width)
        lo, hi = max(s, int(first.min())), min(e, int(last.max()))
        at = torch.arange(lo, hi) if lo < hi else torch.tensor([s])  # nothing to label: a 1-position head
        logits = target(tokens[:, s:e], cache, logits_at=(at - s).expand(n, -1).to(tokens.device)).cpu()
        cache.lengths += e - s
        keep = (at >= first[:, None]) & (at < last[:, None])
        if lo >= hi or not keep.any():
            continue
        scored = topk_with_tail(logits[keep], k)
        counts = keep.sum(1).tolist()
        for i, piece in enumerate(zip(*(x.split(counts) for x in scored))):
            if counts[i]:
                parts[i].append(piece)
    return [tuple(torch.cat(xs) for xs in zip(*p)) if p else empty_labels(k) for p in parts]


def empty_labels(k: int) -> tuple[torch.Tensor, ...]:
    return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k, dtype=torch.float16), torch.zeros(0)


def length_batches(texts: list[Text], batch_tokens: int) -> list[list[int]]:
    """Indices of `texts` grouped, by length, into batches of at most `batch_tokens` padded tokens."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].tokens))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(texts[i].tokens) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pack_shard(texts: list[Text], labels: list[tuple[torch.Tensor, ...]], k: int) -> dict[str, torch.Tensor]:
    """One shard's tensors (see the module docstring); no texts make a valid shard with no rows."""
    counts = torch.tensor([len(x[0]) for x in labels], dtype=torch.long)
    labels = labels or [empty_labels(k)]
    return {
        "tokens": pad_tokens(texts).int() if texts else torch.zeros(0, 0, dtype=torch.int32),
        "ends": torch.tensor([len(t.tokens) for t in texts], dtype=torch.int32),
        "prompt_lengths": torch.tensor([t.prompt_length for t in texts], dtype=torch.int32),
        "label_offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        **{key: torch.cat([x[j] for x in labels]) for j, key in enumerate(LABEL_KEYS)},
    }


def force_shard(target: CausalLM, texts: list[Text], k: int, batch_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """Score `texts` (batched by length) and pack them as one shard, rows in length order."""
    texts = [t for t in texts if t.labels > 0]
    batches = length_batches(texts, batch_tokens)
    ordered = [texts[i] for b in batches for i in b]
    labels = [lab for b in batches for lab in score_batch(target, [texts[i] for i in b], k)]
    return pack_shard(ordered, labels, k)


def read_index(path: Path) -> dict[str, torch.Tensor]:
    """A forced shard's small tensors (tokens and offsets); labels are read per row when needed."""
    with safe_open(str(path), "pt") as f:
        index = {key: f.get_tensor(key) for key in INDEX_KEYS}
        index["k"] = torch.tensor(f.get_slice("topk_ids").get_shape()[-1])
    return index


def read_labels(path: Path, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """Packed label rows [start, stop) of a forced shard, read from the file without loading the rest."""
    with safe_open(str(path), "pt") as f:
        return tuple(f.get_slice(key)[start:stop] for key in LABEL_KEYS)


def shard_meta(path: Path) -> dict[str, float]:
    with safe_open(str(path), "pt") as f:
        return {k: float(v) for k, v in (f.metadata() or {}).items() if k != "corpus"}


def corpus_stats(data_dir: Path) -> dict[str, float]:
    """Data size and teacher speed of one corpus's shards, summed over every run that wrote them."""
    paths = shard_paths(data_dir)
    metas = [shard_meta(p) for p in paths]
    total = {key: sum(m.get(key, 0.0) for m in metas) for key in ("labelled_tokens", "scored_tokens", "wall_s")}
    wall = max(total["wall_s"], 1e-9)
    return {"shards": len(paths), "bytes": sum(p.stat().st_size for p in paths), **total,
            "tokens_per_s": total["scored_tokens"] / wall, "labelled_tokens_per_s": total["labelled_tokens"] / wall}


def onpolicy_items(source_dir: Path, start: int = 0) -> Items:
    """The generating teacher's shards (from the `start`-th), one item each, as texts to re-score.

    The directory is listed again before each shard, so shards written meanwhile are picked up.
    """
    i = start
    while i < len(paths := shard_paths(source_dir)):
        sh = read_shard(paths[i])
        yield i, [Text(sh["tokens"][r, : int(sh["ends"][r])].tolist(), int(sh["prompt_lengths"][r]))
                  for r in range(sh["tokens"].shape[0])]
        i += 1


def pin_stream_settings(out_dir: Path, settings: dict) -> None:
    """Record the settings the corpus streams depend on (seed, window) on the first run; refuse to resume
    with others, whose cursors would point into a different stream."""
    path = out_dir / "streams.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != settings:
            raise ValueError(f"{out_dir} holds shards made with {recorded}, not {settings}: use another --work-dir")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))


def resume_cursor(data_dir: Path) -> int:
    """Where a corpus's stream continues: the cursor its last shard recorded (0 when there is none)."""
    paths = shard_paths(data_dir)
    return int(shard_meta(paths[-1]).get("cursor", 0)) if paths else 0


def run_teacher_force(target: CausalLM, sources: dict[str, Callable[[int], Iterator[tuple[int, list[Text]]]]],
                      out_dir: Path, k: int = TOP_K, batch_tokens: int = 4096,
                      max_shards: int | None = None, make_shard=None, weights: dict[str, float] | None = None,
                      follow: set[str] = frozenset(), poll_s: float = 30.0,
                      follow_idle_s: float = 900.0) -> dict[str, dict]:
    """Write shards of every corpus in turn, `weights[name]` shards of it a turn on average (default 1), until
    all are done (or `max_shards` in all).

    sources[name](cursor) yields that corpus's (next cursor, texts) groups from item `cursor` on
    (`corpora.grouped`); a corpus resumes at the cursor of the last shard its directory holds. A corpus that
    runs dry is opened again at its cursor on its next turn, so text written meanwhile (the engine's
    on-policy text, beside this) is scored; while one of `follow` has nothing new, the run looks again every
    `poll_s`, and ends once nothing new has come for `follow_idle_s`. (A stream that ran dry once used to be
    dropped for good: the on-policy corpus stopped at 5 shards while 21 more shards of text were written.)
    make_shard(target, texts, k, batch_tokens): what a shard holds (default `force_shard`).
    """
    make_shard = make_shard or force_shard
    weights = {name: (weights or {}).get(name, 1.0) for name in sources}

    def reopen(name: str):
        return sources[name](resume_cursor(out_dir / name))

    streams = {name: reopen(name) for name in sources if weights[name] > 0}
    credit = dict.fromkeys(streams, 0.0)
    written, last_new = 0, time.monotonic()
    bar = tqdm(unit="tok", desc="teacher forcing", disable=max_shards is not None)
    while streams and (max_shards is None or written < max_shards):
        wrote_this_turn = 0
        for name in list(streams):
            credit[name] += weights[name]
            while credit[name] >= 1.0 and (max_shards is None or written < max_shards):
                cursor, texts = next(streams[name], (None, None))
                if texts is None:  # dry: open it again where it stopped, for what was written since
                    streams[name] = reopen(name)
                    cursor, texts = next(streams[name], (None, None))
                if texts is None:
                    credit[name] = 0.0
                    if name not in follow:
                        del streams[name]
                    break
                credit[name] -= 1.0
                _write_forced(target, make_shard, name, cursor, texts, out_dir, k, batch_tokens, bar)
                written, wrote_this_turn = written + 1, wrote_this_turn + 1
        if wrote_this_turn:
            last_new = time.monotonic()
        elif streams:  # only followed corpora are left, with nothing new
            if time.monotonic() - last_new >= follow_idle_s:
                log.info("no new text for %s in %.0fs: done", sorted(streams), follow_idle_s)
                break
            if time.monotonic() - last_new < poll_s:
                log.info("waiting for new text for %s (up to %.0fs)", sorted(streams), follow_idle_s)
            time.sleep(poll_s)
    bar.close()
    return {name: corpus_stats(out_dir / name) for name in sources}


def _write_forced(target, make_shard, name: str, cursor: int, texts: list[Text], out_dir: Path, k: int,
                  batch_tokens: int, bar) -> None:
    index = len(shard_paths(out_dir / name))
    t0 = time.monotonic()
    shard = make_shard(target, texts, k, batch_tokens)
    wall = time.monotonic() - t0
    scored, labelled = int(shard["ends"].sum()), int(shard["label_offsets"][-1])
    write_shard(out_dir / name, index, shard, metadata={
        "corpus": name, "cursor": str(cursor), "wall_s": f"{wall:.3f}", "scored_tokens": str(scored),
        "labelled_tokens": str(labelled), "k": str(k)})
    bar.update(scored)
    log.info("%s shard %d: %d sequences, %d tokens (%d labelled) in %.1fs: %.0f tokens/s, %.0f labelled/s",
             name, index, len(shard["ends"]), scored, labelled, wall, scored / max(wall, 1e-9),
             labelled / max(wall, 1e-9))
