"""`saguaro distill`: teacher data, training and evaluation of a draft, resumable at every stage.

Phases (`--phase`): `teacher` writes target continuations as shards, `teacher-force` has the target
score existing text (`--corpus`: ShareGPT train turns, Python source, the `teacher` phase's shards),
`train` trains on whatever shards exist (waiting for more; `--teacher forced` for the teacher-forced
ones), `eval` reports agreement (T=0) and expected acceptance (T=1) of the draft in --out, `all`
alternates teacher and training in one process. Running a teacher and `train` as two processes uses
two cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from saguaro.distill import draft as draft_lib
from saguaro.distill.corpora import grouped, python_items, sharegpt_items
from saguaro.distill.evaluate import acceptance_t1, agreement_report, decode_step_ms, target_probs
from saguaro.distill.feature_eval import feature_report, target_states
from saguaro.distill.feature_train import FeatureTrainer
from saguaro.distill.features import feature_shard
from saguaro.distill.forced import TOP_K, corpus_stats, onpolicy_items, pin_stream_settings, run_teacher_force
from saguaro.distill.teacher import generate_shard, read_shard, shard_paths, train_prompts, write_shard
from saguaro.distill.train import Trainer
from saguaro.gguf_blocks import use_file_weights
from saguaro.loader import cache_root, load_model, resolve_checkpoint
from saguaro.models.feature_draft import FeatureDraft, build_feature_draft
from saguaro.models.transformer import CausalLM
from saguaro.prompts import load_prompts
from saguaro.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class DistillOptions:
    target: str
    out: Path
    data: list[str]
    tokens: int
    seed: int = 0
    layers: list[int] | None = None
    head_vocab: int = 8192
    phase: str = "all"
    work_dir: Path | None = None
    shard_prompts: int = 64
    max_new_tokens: int = 256
    max_prompt_tokens: int = 256
    greedy_fraction: float = 0.6
    lr: float = 5e-4
    batch_size: int = 8
    eval_every: int = 200
    init_from: Path | None = None
    bf16: bool = False  # bfloat16 autocast for the training forward and backward
    max_epochs: float | None = None  # per run: wait for teacher data beyond this many passes over it
    teacher: str = "generate"  # training data: "generate" (on-policy shards) or "forced" (teacher forcing)
    corpus: dict[str, float] | None = None  # teacher-forced corpora and their weights in the training mix
    top_k: int = TOP_K  # teacher forcing keeps this many log-probabilities per position
    window: int = 512  # tokens per teacher-forced sequence
    onpolicy_dir: Path | None = None  # generated shards to re-score (default: the work dir's teacher/)
    depth: int = 3  # drafting steps a feature draft's training unrolls
    grow_from: list[int] | None = None  # with init_from: add one layer per target layer named, on top
    teacher_dtype: str = "float32"  # the teacher phases' target (teacher, teacher-force; bfloat16: ~1.6x faster)
    anneal: int | None = None  # train: branch off the run's state, lr falling to 0 over this many steps, then stop
    loss: str = "tail"  # on teacher-forced data: "tail" (KL, top-k plus tail), "topk" (top-k only) or "tv"

    def corpora(self) -> dict[str, float]:
        return self.corpus or dict(DEFAULT_CORPUS)


CORPORA = ("sharegpt", "python", "onpolicy")
DEFAULT_CORPUS = {"sharegpt": 1.0, "python": 1.0, "onpolicy": 1.0}


def parse_corpus(text: str) -> dict[str, float]:
    """"sharegpt,python:0.5,onpolicy:2" -> {name: weight}; a weight defaults to 1."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, weight = item.partition(":")
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"corpus weight must be a number, got {item!r}") from None
        if out[name] < 0:
            raise ValueError(f"corpus weight must be >= 0, got {item!r}")
    if not out:
        raise ValueError("--corpus names no corpus")
    return out


def work_dir(opts: DistillOptions) -> Path:
    return opts.work_dir or cache_root() / "distill" / Path(resolve_checkpoint(opts.target)).name


def run_teacher(opts, target, tokenizer, data_dir: Path, max_shards: int | None = None) -> None:
    prompts = train_prompts(tokenizer, opts.data, opts.seed, opts.max_prompt_tokens)
    per = opts.shard_prompts
    total = len(prompts) // per
    done = len(shard_paths(data_dir))
    for index in tqdm(range(done, total if max_shards is None else min(total, done + max_shards)),
                      desc="teacher shards", initial=done, total=total, disable=max_shards is not None):
        g = torch.Generator().manual_seed(opts.seed * 7919 + index)
        temperature = 0.0 if torch.rand(1, generator=g).item() < opts.greedy_fraction else 0.8
        t0 = time.monotonic()
        shard = generate_shard(target, prompts[index * per : (index + 1) * per], opts.max_new_tokens,
                               tokenizer.stop_token_ids, temperature, g)
        write_shard(data_dir, index, shard)
        new = int((shard["ends"] - shard["prompt_lengths"]).sum())
        log.info("shard %d: %d new tokens at T=%.1f in %.0fs", index, new, temperature, time.monotonic() - t0)


def forced_sources(opts: DistillOptions, tokenizer, data_dir: Path) -> dict:
    """Per corpus, a function from a cursor to that corpus's groups of texts (see run_teacher_force).
    On-policy shards are re-scored one for one."""
    rows, seed, window = opts.shard_prompts, opts.seed, opts.window
    makers = {
        "sharegpt": lambda cursor: grouped(sharegpt_items(tokenizer, seed, cursor, window), rows),
        "python": lambda cursor: grouped(python_items(tokenizer, seed, cursor, window), rows),
        "onpolicy": lambda cursor: grouped(onpolicy_items(opts.onpolicy_dir or data_dir, cursor), 1),
    }
    unknown = set(opts.corpora()) - set(makers)
    if unknown:
        raise ValueError(f"unknown corpus {sorted(unknown)}; choose from {list(CORPORA)}")
    return {name: makers[name] for name in opts.corpora()}


def feature_target(opts: DistillOptions) -> tuple[CausalLM, str]:
    """The target as the engine runs it by default (bfloat16 over the GGUF's own blocks where possible):
    the hidden states a feature-conditioned draft is trained on must be the ones it will be given."""
    target = load_model(opts.target, dtype=torch.bfloat16)
    weights = use_file_weights(target, Path(opts.target), "auto", cache_root() / "kernels")
    return target, weights


def run_feature_teacher(opts: DistillOptions, tokenizer, data_dir: Path, work: Path) -> dict:
    """Teacher forcing that keeps the target's hidden states (`features.py`), into <work>/features/<corpus>."""
    target, weights = feature_target(opts)
    log.info("feature teacher: bfloat16 target, %s weights", weights)
    t0 = time.monotonic()
    pin_stream_settings(work / "features", {"seed": opts.seed, "window": opts.window, "weights": weights})
    stats = run_teacher_force(target, forced_sources(opts, tokenizer, data_dir), work / "features", opts.top_k,
                              make_shard=feature_shard)
    log.info("feature teacher done in %.0fs: %s", time.monotonic() - t0, stats)
    return stats


def train_sources(opts: DistillOptions, work: Path) -> dict[Path, float]:
    if opts.teacher in ("forced", "features"):
        return {work / opts.teacher / name: w for name, w in opts.corpora().items() if w > 0}
    return {work / "teacher": 1.0}


def eval_shards(opts, target, tokenizer, data_dir: Path) -> dict[str, dict]:
    """Greedy target continuations of held-out prompts, generated once and cached."""
    out = {}
    for dataset in ("humaneval", "sharegpt"):
        path = data_dir / f"eval-{dataset}.safetensors"
        if not path.is_file():
            data_dir.mkdir(parents=True, exist_ok=True)
            texts = load_prompts(dataset, "eval")[:32]
            prompts = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
            prompts = [p for p in prompts if len(p) <= opts.max_prompt_tokens]
            shard = generate_shard(target, prompts, 128, tokenizer.stop_token_ids, 0.0, torch.Generator())
            save_file({k: v.contiguous() for k, v in shard.items()}, str(path))
        out[dataset] = read_shard(path)
    return out


def t1_references(target, draft, shards: dict[str, dict], cache_dir: Path | None = None) -> dict[str, list]:
    """The target's distributions the T=1 acceptance compares the draft with, once per run, kept in
    `cache_dir` (a restarted run spent 15 minutes of a loaded core recomputing them)."""
    t0 = time.monotonic()
    refs = {}
    for name, shard in shards.items():
        key = hashlib.blake2b(digest_size=8)  # every weight of the target (~0.5 s), the rows, the draft's head
        for tensor in (*target.state_dict().values(), shard["tokens"], shard["ends"], shard["prompt_lengths"],
                       draft.output_token_ids):
            if tensor is not None:
                key.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        path = cache_dir / f"eval-t1-{name}-{key.hexdigest()}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            rows = load_file(str(path))
            refs[name] = [rows[str(i)] for i in range(len(rows))]
            continue
        refs[name] = target_probs(target, shard, draft.output_token_ids)
        if path is not None:
            save_file({str(i): p.contiguous() for i, p in enumerate(refs[name])}, str(path))
    log.info("target distributions for the T=1 evaluation in %.0fs", time.monotonic() - t0)
    return refs


def draft_evaluator(opts: DistillOptions, target: CausalLM, draft: CausalLM, evals: dict[str, dict]):
    """draft -> its held-out report; what the report needs of the target is computed once, here.

    A feature draft is given the states of the target as the engine runs it (`feature_target`)."""
    if not isinstance(draft, FeatureDraft):
        refs = t1_references(target, draft, evals, work_dir(opts) / "teacher")
        return lambda d: evaluate(d, evals, refs)
    fast_target, _ = feature_target(opts)
    t0 = time.monotonic()
    states = {name: target_states(fast_target, shard) for name, shard in evals.items()}
    log.info("target states for the evaluation in %.0fs", time.monotonic() - t0)
    return lambda d: {name: feature_report(d, fast_target, shard, states[name]) for name, shard in evals.items()}


def evaluate(draft, shards: dict[str, dict], refs: dict[str, list] | None = None) -> dict[str, dict]:
    """Greedy agreement per held-out set; with `t1_references`, also the expected acceptance at T=1."""
    draft.eval()
    out = {name: agreement_report(draft, shard) for name, shard in shards.items()}
    for name, p_rows in (refs or {}).items():
        out[name]["accept_t1"] = acceptance_t1(draft, shards[name], p_rows)["accept_t1"]
    return out


def make_draft(opts, target, tokenizer, state_dir: Path):
    """A fresh draft from target layers, or a copy of `opts.init_from` (trained further, fp32)."""
    vocab_file = state_dir / "output_vocab.json"
    if opts.init_from is not None:
        draft = load_model(opts.init_from, embeddings_from=target)
        if opts.grow_from:
            draft = draft_lib.grow_draft(draft, target, opts.grow_from)
        state_dir.mkdir(parents=True, exist_ok=True)
        vocab_file.write_text(json.dumps(draft.config.output_token_ids))
        return draft
    if vocab_file.is_file():
        output_ids = json.loads(vocab_file.read_text())
    else:
        output_ids = draft_lib.frequent_tokens(tokenizer, opts.head_vocab)
        state_dir.mkdir(parents=True, exist_ok=True)
        vocab_file.write_text(json.dumps(output_ids))
    if opts.teacher == "features":
        return build_feature_draft(target, opts.layers or [len(target.layers) - 1], output_ids)
    layers = opts.layers or [0, 1]  # first layers: the best agreement at init (measured, see docs)
    return draft_lib.build_draft(target, layers, output_ids)


def _record(tr: Trainer, opts: DistillOptions) -> dict:
    """What goes into the draft's config so the run can be repeated."""
    rec = {"step": tr.step, "tokens_seen": tr.tokens_seen, "seed": opts.seed, "lr": opts.lr,
           "teacher_tokens": tr.teacher_tokens(), "teacher_shards": len(tr._shard_files),
           "train_wall_s": round(tr.wall_s), "bf16_autocast": opts.bf16, "teacher": opts.teacher}
    if opts.teacher == "forced":
        rec["corpus"] = opts.corpora()
        rec["loss"] = opts.loss
        rec["teacher_force"] = {d.name: corpus_stats(d) for d in tr.sources}
    if opts.init_from is not None:
        rec["init_from"] = json.loads((Path(opts.init_from) / "config.json").read_text()).get("saguaro_distill")
    if opts.grow_from:
        rec["grown_from_target_layers"] = opts.grow_from
    if tr.anneal is not None:
        rec["anneal"] = {"from_step": tr.anneal[0], "steps": tr.anneal[1]}
    return rec


def start_trainer(trainer: Trainer, opts: DistillOptions) -> None:
    """Resume the run from its saved state, or start it from `opts.init_from`. An anneal branches off the
    run: its own state (`state-anneal` beside the run's), started from the run's, which it leaves alone."""
    run_state = trainer.state_dir
    if opts.anneal:
        trainer.state_dir = run_state.with_name("state-anneal")
    if trainer.load_state():
        log.info("resumed at step %d (%d tokens)", trainer.step, trainer.tokens_seen)
    elif opts.anneal and trainer.load_state(run_state):
        trainer.anneal = (trainer.step, opts.anneal)
        log.info("annealing from the run's step %d over %d steps", trainer.step, opts.anneal)
    elif opts.init_from is not None:
        meta = json.loads((Path(opts.init_from) / "config.json").read_text()).get("saguaro_distill", {})
        trainer.step, trainer.tokens_seen = meta.get("step", 0), meta.get("tokens_seen", 0)
        trainer.warmup_from = trainer.step
        log.info("starting from %s at step %d (%d tokens)", opts.init_from, trainer.step, trainer.tokens_seen)
    if opts.anneal and trainer.anneal is None:  # no run to branch from: anneal what training starts from
        trainer.anneal = (trainer.step, opts.anneal)


def run_distill(opts: DistillOptions) -> dict:
    if opts.phase == "teacher-text":
        raise ValueError("--phase teacher-text generates through the engine: run it from `saguaro distill`")
    work = work_dir(opts)
    data_dir, state_dir = work / "teacher", work / "state"
    # a teacher phase may score in bfloat16: prefill of 2 x 512 tokens at 1 thread ran at 488 tokens/s against
    # 306 in float32 (AMD EPYC, avx512_bf16); the labels move by bfloat16's rounding, which the engine's default
    # target has as well. Training and evaluation keep the float32 target.
    teacher = opts.phase in ("teacher", "teacher-force")
    target = load_model(opts.target, dtype=getattr(torch, opts.teacher_dtype) if teacher else torch.float32)
    tokenizer = Tokenizer.load(resolve_checkpoint(opts.target), target.config.eos_token_ids)
    if opts.phase == "all" and opts.teacher == "forced":
        raise ValueError("--phase all generates its teacher data; run --phase teacher-force and --phase train")
    if opts.phase == "teacher":
        if opts.teacher == "features":  # on-policy text for a feature draft: the engine's own target writes it
            target, weights = feature_target(opts)
            log.info("generating teacher: bfloat16 target, %s weights", weights)
        else:
            log.info("generating teacher: %s target", opts.teacher_dtype)
        run_teacher(opts, target, tokenizer, data_dir)
        return {}
    if opts.phase == "teacher-features":
        return {"teacher_features": run_feature_teacher(opts, tokenizer, data_dir, work)}
    if opts.phase == "teacher-force":
        log.info("teacher forcing with a %s target", opts.teacher_dtype)
        t0 = time.monotonic()
        pin_stream_settings(work / "forced", {"seed": opts.seed, "window": opts.window})
        # the corpus weights steer the teacher too, and engine text still being written is waited for
        stats = run_teacher_force(target, forced_sources(opts, tokenizer, data_dir), work / "forced", opts.top_k,
                                  weights=opts.corpora(), follow={"onpolicy"} & set(opts.corpora()))
        log.info("teacher forcing done in %.0fs: %s", time.monotonic() - t0, stats)
        return {"teacher_force": stats}
    evals = eval_shards(opts, target, tokenizer, data_dir)
    if opts.phase == "eval":
        draft = load_model(opts.out, embeddings_from=target)
        report = draft_evaluator(opts, target, draft, evals)(draft)
        cost = decode_step_ms({"target": target, "draft": draft})  # at the caller's --threads
        report["forward_ms"] = {**cost, "threads": torch.get_num_threads(), "draft_over_target":
                                cost["draft"] / cost["target"]}
        log.info("eval: %s", report)
        return report
    draft = make_draft(opts, target, tokenizer, state_dir)
    trainer_class = partial(FeatureTrainer, depth=opts.depth) if opts.teacher == "features" else Trainer
    trainer = trainer_class(draft, train_sources(opts, work), state_dir, opts.seed, lr=opts.lr,
                            batch_size=opts.batch_size, bf16=opts.bf16, loss=opts.loss)
    start_trainer(trainer, opts)
    evaluate_draft = draft_evaluator(opts, target, draft, evals)
    bar = tqdm(total=opts.tokens, initial=trainer.tokens_seen, unit="tok", desc="distill")
    report: dict = {}

    def on_step(tr: Trainer, loss: float) -> None:
        nonlocal report
        bar.update(tr.tokens_seen - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", step=tr.step)
        if tr.step % opts.eval_every == 0:
            report = evaluate_draft(tr.draft)
            log.info("step %d tokens %d loss %.3f eval %s", tr.step, tr.tokens_seen, loss, report)
            draft_lib.save_draft(tr.draft, opts.out, {"saguaro_distill": {
                **_record(tr, opts), "eval": report}})
        if opts.phase == "all" and tr.step % 50 == 0:
            run_teacher(opts, target, tokenizer, data_dir, max_shards=1)

    if opts.phase == "all" and not shard_paths(data_dir):
        run_teacher(opts, target, tokenizer, data_dir, max_shards=1)
    trainer.run(opts.tokens, on_step=on_step, max_epochs=opts.max_epochs)
    report = evaluate_draft(trainer.draft)
    draft_lib.save_draft(trainer.draft, opts.out, {"saguaro_distill": {
        **_record(trainer, opts), "eval": report}})
    return report
