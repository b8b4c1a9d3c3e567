"""The `saguaro` command line: generate, distill (and more as they land)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from saguaro.ssd.options import (AUTO_MIN_CONFIDENCE, FALLBACK_CHOICES, FANOUT_SHAPES, PRIOR_ACCEPTANCE, PRIOR_R,
                                 PROMPT_LOOKUP_MIN_MATCH, SSDOptions)
from saguaro.serve.async_engine import STREAM_INTERVAL_S

log = logging.getLogger("saguaro")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _core_list(text: str) -> list[int]:
    try:
        cores = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected core numbers like 2,3, got {text!r}") from None
    if not cores or min(cores) < 0:
        raise argparse.ArgumentTypeError(f"expected core numbers like 2,3, got {text!r}")
    return cores


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["auto", "ar", "sd", "ssd"], default="auto",
                   help="decoding mode; auto (default): speculation (sd on a CPU, ssd where the draft has a GPU or "
                        "worker of its own) or ar, round by round, whichever measures faster")
    p.add_argument("--target", help="target checkpoint: HF directory or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--draft", help="draft checkpoint, or 'ngram' (default: the embedded distilled draft)")
    p.add_argument("--k", type=_positive_int, default=4, help="draft tokens per round, at most (default: 4)")
    p.add_argument("--min-confidence", type=float,
                   help="sd: a row stops drafting after a token the draft gave less than this top probability "
                        f"(default: {AUTO_MIN_CONFIDENCE} under mode auto, 0 = always K under --mode sd)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX), else float32")
    p.add_argument("--weights", default="auto", choices=["auto", "file", "file-int8", "dense"],
                   help="for a .gguf target: auto (default) multiplies by the file's Q4_1/Q8_0 blocks as stored "
                        "where the model runs in bfloat16; file-int8 also quantizes the activations to int8 "
                        "as llama.cpp does (faster, further from float32; needs AVX512_VNNI); dense "
                        "dequantizes them")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the eager forward (default: decode and verification steps compiled for this CPU, "
                        "built once per machine and cached)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=_positive_int, help="torch threads for the target")
    s = p.add_argument_group("ssd")
    s.add_argument("--fanout-budget", "--fan-out-budget", dest="fanout_budget", type=_positive_int,
                   help="branches pre-drafted per round (default: start at 3(K+1), resized so the tree takes "
                        "~80%% of a verification)")
    s.add_argument("--fanout", choices=FANOUT_SHAPES, default=FANOUT_SHAPES[0],
                   help="how the branch budget spreads over outcome positions")
    s.add_argument("--acceptance", type=float, default=PRIOR_ACCEPTANCE,
                   help=f"prior a_p used to shape the fan-out (default: {PRIOR_ACCEPTANCE})")
    s.add_argument("--power-r", type=float, default=PRIOR_R,
                   help=f"prior miss-rate exponent r used to shape the fan-out (default: {PRIOR_R})")
    s.add_argument("--fixed-fanout", action="store_true", help="keep a_p and r at the priors (no online fit)")
    s.add_argument("--saguaro-c", type=float, default=1.0, help="Saguaro sampling C in [0, 1] (1 = plain)")
    s.add_argument("--fallback", choices=FALLBACK_CHOICES, default="auto",
                   help="on a cache miss: auto picks neural or ngram per round from measured costs (b*)")
    s.add_argument("--no-worker", action="store_true", help="run the drafter in this process (no overlap)")
    s.add_argument("--lookup-min-match", type=int, default=PROMPT_LOOKUP_MIN_MATCH,
                   help="greedy rows whose last N tokens occurred before take the prompt-lookup continuation "
                        f"ahead of SD's draft and SSD's cache (default: {PROMPT_LOOKUP_MIN_MATCH}; 0: off)")
    s.add_argument("--draft-cores", type=_core_list,
                   help="CPU cores for the draft worker, e.g. 6,7 (default: the last core); the target keeps the rest")
    s.add_argument("--draft-threads", type=_positive_int, help="torch threads of the draft worker (default: its cores)")
    s.add_argument("--worker-timeout", type=float,
                   help="seconds to wait for one answer of the draft worker before finishing with a local "
                        "draft (default: 10, a few seconds past the slowest expected round)")
    s.add_argument("--draft-worker", metavar="HOST:PORT",
                   help="attach to a draft worker started with `saguaro draft-worker --listen HOST:PORT` instead "
                        "of spawning one (its secret: $SAGUARO_WORKER_TOKEN)")


def _logit_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS like 13=-100, got {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below MIN_P x the top token's probability")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2..2, over the output tokens")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2..2, over the output tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0 (1 = off): divides the logits of tokens already in the prompt or output")
    p.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100..100) to a token's logit (repeatable)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end the text where STR first appears, finish_reason 'stop' (repeatable)")


def sampling_params(args):
    from saguaro.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos,
                              stop=list(getattr(args, "stop", None) or []), min_p=args.min_p,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                              repetition_penalty=args.repetition_penalty, logit_bias=dict(args.logit_bias),
                              n=getattr(args, "n", 1), logprobs=getattr(args, "logprobs", None))
    except ValueError as e:
        raise UsageError(str(e)) from None


def ssd_options(args):
    """The SSD options of the command line (an SSDOptions), a bad value reported as a UsageError."""
    if args.draft_worker:
        from saguaro.ssd.channel import parse_address

        if args.no_worker:
            raise UsageError("--draft-worker and --no-worker contradict each other")
        try:
            parse_address(args.draft_worker)
        except ValueError as e:
            raise UsageError(f"--draft-worker: {e}") from None
    try:
        return SSDOptions(fanout_budget=args.fanout_budget or 0, fanout_shape=args.fanout, acceptance=args.acceptance,
                          r=args.power_r, saguaro_c=args.saguaro_c, fallback=args.fallback, worker=not args.no_worker,
                          fit=not args.fixed_fanout, draft_cores=args.draft_cores, draft_threads=args.draft_threads,
                          prompt_lookup_min_match=args.lookup_min_match, worker_timeout=args.worker_timeout,
                          draft_worker=args.draft_worker or None, min_confidence=args.min_confidence)
    except ValueError as e:
        raise UsageError(str(e)) from None


def make_llm(args):
    from saguaro.llm import LLM

    if getattr(args, "draft_worker", None) and args.mode not in ("ssd", "auto"):
        raise UsageError(f"--draft-worker drafts for SSD: use --mode ssd or auto, not {args.mode}")
    ssd = ssd_options(args) if args.mode in ("ssd", "auto", "sd") else None
    return LLM(args.target, mode=args.mode, draft=args.draft, k=args.k, dtype=args.dtype,
               device=args.device, threads=args.threads, ssd=ssd,
               compile=None if args.compile else False, weights=args.weights)


def cmd_generate(args) -> None:
    if not args.prompts:
        raise UsageError("no prompts given")
    if any(not p for p in args.prompts):
        raise UsageError("a prompt is empty")
    params = sampling_params(args)
    with make_llm(args) as llm:
        outputs = llm.generate(args.prompts, params, chat=args.chat)
        for out in outputs:
            if args.json:
                print(json.dumps(json_row(out, llm.tokenizer)))
                continue
            for choice in out.outputs:
                print(choice.text)
                if choice.logprobs is not None:
                    print(" ".join(f"{llm.tokenizer.decode([t.token_id])!r}:{t.logprob:.3f}" for t in choice.logprobs),
                          file=sys.stderr)
            m = out.metrics
            print(f"[{m['generated_tokens']} tokens in {m['time_s']:.2f}s, {m['tokens_per_s']:.1f} tokens/s, "
                  f"mode {m['mode']}]", file=sys.stderr)


def json_row(out, tokenizer) -> dict:
    """One prompt's JSON line: its first choice at the top, every choice under "choices" when n > 1."""

    def choice(c) -> dict:
        row = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
        if c.logprobs is not None:
            row["logprobs"] = [{"token_id": t.token_id, "token": tokenizer.decode([t.token_id]), "logprob": t.logprob,
                                "top_logprobs": [[i, v] for i, v in t.top]} for t in c.logprobs]
        return row

    row = {"prompt": out.prompt, **choice(out.outputs[0]), "metrics": out.metrics}
    if len(out.outputs) > 1:
        row["choices"] = [choice(c) for c in out.outputs]
    return row


def cmd_distill(args) -> None:
    from saguaro.distill.run import DistillOptions, parse_corpus, run_distill
    from saguaro.embedded import embedded_target_path

    import torch

    torch.set_num_threads(args.threads)
    if args.anneal and args.phase != "train":
        raise UsageError("--anneal continues a run's training: give it --phase train")
    if args.grow_from and not args.init_from:
        raise UsageError("--grow-from adds layers to a trained draft: give it --init-from")
    opts = DistillOptions(
        target=args.target or str(embedded_target_path()), out=Path(args.out),
        data=args.data.split(","), tokens=args.tokens, seed=args.seed,
        layers=[int(x) for x in args.layers.split(",")] if args.layers else None,
        head_vocab=args.head_vocab, phase=args.phase,
        work_dir=Path(args.work_dir) if args.work_dir else None, lr=args.lr,
        init_from=Path(args.init_from) if args.init_from else None, bf16=args.bf16, max_epochs=args.max_epochs,
        teacher=args.teacher, corpus=parse_corpus(args.corpus), top_k=args.top_k, window=args.window,
        onpolicy_dir=Path(args.onpolicy_dir) if args.onpolicy_dir else None, shard_prompts=args.shard_rows,
        depth=args.depth, eval_every=args.eval_every,
        grow_from=[int(x) for x in args.grow_from.split(",")] if args.grow_from else None,
        teacher_dtype=args.teacher_dtype, anneal=args.anneal, loss=args.loss,
    )
    if opts.phase == "teacher-text":
        report = _teacher_text(opts, args.threads)
    else:
        report = run_distill(opts)
    if report:
        print(json.dumps(report, indent=2))


def _teacher_text(opts, threads: int) -> dict:
    """distill --phase teacher-text: the engine (plain decoding, at --threads) continues train prompts."""
    from saguaro import LLM
    from saguaro.distill.run import work_dir
    from saguaro.distill.text import run_text_teacher

    llm = LLM(opts.target, mode="ar", threads=threads)

    def generate(prompts, params):
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    return run_text_teacher(generate, llm.tokenizer, work_dir(opts) / "teacher-text", opts.data, opts.seed,
                            shard_prompts=opts.shard_prompts, max_new_tokens=opts.max_new_tokens,
                            max_prompt_tokens=opts.max_prompt_tokens, greedy_fraction=opts.greedy_fraction)


def cmd_bench(args) -> None:
    from saguaro import bench

    llm_args = argparse.Namespace(**{**vars(args), "mode": "ar"})
    if args.analysis:
        cmd_analyses(args, llm_args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bench.check_modes(modes)
    with make_llm(llm_args) as llm:
        report = bench.bench(llm, modes, args.datasets.split(","), args.num_prompts, args.max_tokens,
                             args.temperature, args.k, args.draft, args.seed, args.batch_size, ssd=ssd_options(args))
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
    if args.plot:
        from saguaro.bench_plot import plot_bench

        plot_bench(report, args.plot)


def cmd_analyses(args, llm_args) -> None:
    from saguaro.analyses import options_from_args, resolve, run_analysis

    names = resolve(args.analysis)
    opts = options_from_args(args, ssd_options(args))
    with make_llm(llm_args) as llm:
        for name in names:
            out = run_analysis(name, llm, opts)
            print(f"{name}: {out['json']} {out['png']}")


def cmd_serve(args) -> None:
    from saguaro.serve.server import serve

    with make_llm(args) as llm:
        serve(llm, host=args.host, port=args.port, api_key=args.api_key, max_concurrency=args.max_concurrency,
              access_log=args.verbose, stream_interval_s=args.stream_interval_ms / 1000)


def cmd_chat(args) -> None:
    from saguaro.chat import run_chat

    params = sampling_params(args)
    with make_llm(args) as llm:
        run_chat(llm, params, show_metrics=args.metrics, system=args.system)


def cmd_draft_worker(args) -> None:
    from saguaro.ssd.worker import listen

    logging.getLogger("saguaro.ssd").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    listen(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saguaro", description="Exact speculative (and SSD) decoding.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete prompts")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--n", type=_positive_int, default=1, help="completions per prompt (choice i seeded from (seed, i))")
    g.add_argument("--logprobs", type=int, metavar="N",
                   help="report each token's log-probability and the N most likely (0..20) under the processed "
                        "distribution (--json: in the JSON; else on stderr)")
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="compare decoding modes on the same prompts in one run")
    add_model_args(b)
    b.add_argument("--modes", default="ar,sd",
                   help="comma-separated: ar, sd, sd-ngram, ssd, hf, hf-assisted, llamacpp, llamacpp-f32 "
                        "(default: ar,sd)")
    b.add_argument("--datasets", default="humaneval,sharegpt")
    b.add_argument("--num-prompts", type=_positive_int, default=4)
    b.add_argument("--max-tokens", type=_positive_int, default=64)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=_positive_int, default=1, help="prompts per engine.run batch (default: 1)")
    b.add_argument("--json", help="write the full report here")
    b.add_argument("--plot", help="write a bar chart of tokens/s per mode and dataset here (PNG)")
    from saguaro.analyses import add_analysis_args

    add_analysis_args(b)
    b.set_defaults(func=cmd_bench)

    w = sub.add_parser("draft-worker", help="serve SSD drafting to engines that attach with --draft-worker HOST:PORT")
    from saguaro.ssd.worker import listen_parser

    listen_parser(w)
    w.set_defaults(func=cmd_draft_worker)

    d = sub.add_parser("distill", help="distill a small draft model from a target")
    d.add_argument("--target", help="target checkpoint (default: embedded SmolLM2-135M)")
    d.add_argument("--out", required=True, help="directory for the draft checkpoint")
    d.add_argument("--data", default="sharegpt,humaneval", help="prompt sets for teacher data")
    d.add_argument("--tokens", type=_positive_int, default=20_000_000, help="training tokens to reach")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--layers", help="target layers to initialise the draft from, e.g. 0,1")
    d.add_argument("--head-vocab", type=_positive_int, default=8192, help="draft output vocabulary size")
    d.add_argument("--phase", choices=["all", "teacher", "teacher-text", "teacher-force", "teacher-features", "train",
                                       "eval"],
                   default="all",
                   help="teacher: generate on-policy data; teacher-text: on-policy text through the engine (re-score "
                        "it with teacher-force --corpus onpolicy --onpolicy-dir WORK/teacher-text); "
                        "teacher-force: the target scores --corpus text; "
                        "teacher-features: the same, keeping the bf16 target's hidden states; "
                        "train; eval; all: generate and train in one process (default)")
    d.add_argument("--teacher", choices=["generate", "forced", "features"], default="generate",
                   help="training data: the generated shards (default), the teacher-forced ones (tail loss), or the "
                        "feature shards, which train a feature-conditioned (EAGLE-style) draft")
    d.add_argument("--eval-every", type=_positive_int, default=200,
                   help="training steps between held-out evaluations (default: 200)")
    d.add_argument("--depth", type=_positive_int, default=3,
                   help="drafting steps a feature draft's training unrolls (default: 3)")
    d.add_argument("--corpus", default="sharegpt,python,onpolicy",
                   help="teacher-forced corpora and their weights in training batches, e.g. sharegpt:2,python,"
                        "onpolicy:0.5 (default: all three, equal)")
    d.add_argument("--top-k", type=_positive_int, default=32,
                   help="log-probabilities kept per position by teacher forcing (default: 32)")
    d.add_argument("--window", type=_positive_int, default=512,
                   help="tokens per teacher-forced sequence (default: 512)")
    d.add_argument("--shard-rows", type=_positive_int, default=64,
                   help="prompts (teacher) or sequences (teacher-force) per shard; keep it fixed within a work dir "
                        "(default: 64)")
    d.add_argument("--onpolicy-dir",
                   help="generated shards the onpolicy corpus re-scores (default: the work dir's teacher/)")
    d.add_argument("--work-dir", help="teacher data and training state (default: under ~/.cache/saguaro)")
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--init-from", help="start from this draft checkpoint's weights (when no training state exists)")
    d.add_argument("--grow-from",
                   help="with --init-from: put one more layer on top per target layer named (e.g. 2,3), its residual "
                        "branches zeroed so the grown draft starts where the trained one is")
    d.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="teacher and teacher-force: the target's dtype (bfloat16: faster on CPUs with native bf16)")
    d.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default: 1)")
    d.add_argument("--bf16", action="store_true",
                   help="train under bfloat16 autocast (weights and optimizer stay float32; ~2.5x faster on CPUs "
                        "with native bf16)")
    d.add_argument("--anneal", type=_positive_int, metavar="STEPS",
                   help="train: branch off the run's saved state (into WORK/state-anneal; the run itself goes on "
                        "untouched), the learning rate falling linearly from --lr to zero over STEPS steps, then "
                        "stop and write --out")
    d.add_argument("--loss", choices=["tail", "topk", "tv"], default="tail",
                   help="training on teacher-forced data: KL over the top-k plus the mass outside it (tail, "
                        "default), the top-k alone renormalised on the draft's head (topk, as on generated "
                        "shards), or total variation over the same buckets (tv: 1 - the T=1 acceptance)")
    d.add_argument("--max-epochs", type=float,
                   help="in this run, train on at most this many passes over the teacher data, then wait for more")
    d.set_defaults(func=cmd_distill)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    sv.add_argument("--max-concurrency", type=_positive_int, default=256,
                    help="requests in flight (running or queued) before new ones get 503 (default: 256)")
    sv.add_argument("--stream-interval-ms", type=_non_negative_float, default=STREAM_INTERVAL_S * 1000,
                    help="least time between two chunks of a streamed choice; the first goes out at once "
                         f"(default: {STREAM_INTERVAL_S * 1000:g}; 0 sends every decoding round)")
    sv.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="streaming chat in the terminal (reads stdin; /exit or EOF quits)")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", help="a system message to start the conversation with")
    c.add_argument("--metrics", action="store_true", help="after each reply: tokens/s, TTFT, acceptance, hit rate")
    c.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from saguaro.engine.base import ContextLengthError
    from saguaro.loader import CheckpointError
    from saguaro.ssd.client import WorkerError

    try:
        args.func(args)
    except (UsageError, CheckpointError, ContextLengthError, WorkerError, FileNotFoundError, ValueError,
            TypeError) as e:
        print(f"saguaro: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
