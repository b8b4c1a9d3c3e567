"""The Python API, in the style of vLLM: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from saguaro.embedded import embedded_draft_path, embedded_target_path
from saguaro.engine.base import AREngine, Engine
from saguaro.engine.sequence import Sequence
from saguaro.gguf_blocks import use_file_weights
from saguaro.loader import cache_root, load_model, resolve_checkpoint
from saguaro.models.compiled import compile_step
from saguaro.models.linear import Linear, drop_dense_weights, native_bf16
from saguaro.sampling import SamplingParams, TokenLogprob, choices
from saguaro.speculators.draft import is_feature_checkpoint
from saguaro.serve.detokenizer import StopStrings
from saguaro.ssd.options import SSDOptions
from saguaro.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODES = ("auto", "ar", "sd", "ssd")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
WEIGHTS = ("auto", "file", "file-int8", "dense")


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """"auto": bfloat16 on a CPU that multiplies it natively (AVX512_BF16 or AMX: half the bytes read
    per token, the fastest exact path measured), float32 elsewhere. $SAGUARO_DTYPE overrides "auto"."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    chosen = os.environ.get("SAGUARO_DTYPE", "auto")
    if chosen != "auto":
        return resolve_dtype(chosen, device)
    return "bfloat16" if device == "cpu" and native_bf16() else "float32"


def compile_wanted(compile: bool | None) -> bool:
    """compile=None follows $SAGUARO_COMPILE (default on)."""
    if compile is not None:
        return compile
    return os.environ.get("SAGUARO_COMPILE", "1") not in ("0", "false", "no")


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    index: int = 0  # which of the request's n choices
    logprobs: list[TokenLogprob] | None = None  # with SamplingParams(logprobs=N): one per token, the target's

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


def auto_mode(has_draft: bool, device: str, gpus: int, remote_worker: bool = False) -> str:
    """What mode="auto" weighs against AR round by round (engine/auto.py): with a neural draft, SSD when
    its draft has hardware of its own (a second GPU, or a draft worker started by hand to attach to),
    and on a CPU SD on every core, each row drafting only while the draft is sure. On the 2-core CPUs
    we measured, SSD's split (the target on one core, the draft on the other) verified at ~14 ms a
    round against ~8.6 on both cores, and SD on both cores beat SSD (docs/results.md); without a
    draft, AR."""
    if not has_draft:
        return "ar"
    if remote_worker:
        return "ssd"
    if device.startswith("cuda"):
        return "ssd" if gpus > 1 else "ar"
    return "sd"


def auto_speculation(draft, device: str, ssd: SSDOptions) -> str:
    """The speculative mode `auto` weighs against AR for a neural `draft` (None: the embedded one)."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    mode = auto_mode(True, device, gpus, remote_worker=ssd.draft_worker is not None)
    if mode == "ssd" and is_feature_checkpoint(draft or embedded_draft_path()):
        mode = "sd"  # a feature draft runs in SD, on every core (SSD does not run it yet)
    return mode


class LLM:
    """Load a target (default: the embedded SmolLM2-135M-Instruct) and, for speculative modes, a draft.

    mode: "auto" (with a neural draft, speculation or AR round by round, whichever measures faster:
    SD on every core on a CPU, SSD where the draft has a GPU or worker of its own; see `auto_mode`),
    "ar", "sd" or "ssd".
    dtype: "auto" (default) runs bfloat16 where the CPU multiplies it natively, float32 elsewhere.
    weights: for a .gguf target, "auto" (default) multiplies by the file's quantized blocks as stored
    (Q4_1, Q8_0: what llama.cpp reads, 0.6-1.1 bytes per weight) where the model runs in bfloat16 and
    saguaro's kernels load, "file" insists on that, "file-int8" also quantizes the activations to int8
    per block of 32 as llama.cpp does (faster; further from float32, see docs/results.md), "dense"
    dequantizes every weight to `dtype`.
    compile: run the target's decode and verification steps compiled for this CPU (built once per
    machine, then cached; default on, or $SAGUARO_COMPILE); False keeps the eager forward.
    draft: a checkpoint path, "ngram" for the model-free prompt-lookup speculator, or None for the
    embedded distilled draft.
    ssd: the speculation options (modes "ssd", "auto", and `min_confidence` for "sd"); keyword
    arguments such as `fanout_budget=8`, `min_confidence=0.8` or
    `worker_timeout=5` change single fields of it (see SSDOptions).
    draft_worker="HOST:PORT" (SSD): attach to a worker started with `saguaro draft-worker --listen`
    instead of spawning one; worker_token: its secret (default: $SAGUARO_WORKER_TOKEN).
    """

    def __init__(self, model: str | Path | None = None, mode: str = "auto", draft: str | Path | None = None,
                 k: int = 4, dtype: str = "auto", device: str = "cpu", threads: int | None = None,
                 max_batch_size: int = 64, ssd: SSDOptions | None = None, compile: bool | None = None,
                 weights: str = "auto", **ssd_changes):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        dtype = resolve_dtype(dtype, device)
        ssd = SSDOptions.of(ssd, **ssd_changes)  # bad options fail here, before any loading
        if threads:
            torch.set_num_threads(threads)
        if mode == "auto":
            neural_draft = draft not in (None, "ngram") or (model is None and embedded_draft_path() is not None)
            mode = auto_speculation(draft, device, ssd) if neural_draft else "ar"
            log.info("mode auto: running %s", f"{mode.upper()} or AR round by round (engine/auto.py)"
                     if mode in ("ssd", "sd") else mode)
            if mode in ("ssd", "sd"):  # speculation only in the rounds where it measured faster than AR
                ssd = replace(ssd, auto=True)
        self.mode = "auto" if ssd.auto else mode
        target_path = Path(model) if model is not None else embedded_target_path()
        self.target_path = target_path
        self.target = load_model(target_path, dtype=DTYPES[dtype], device=device)
        self.dtype = dtype
        self.weights = use_file_weights(self.target, target_path, weights, cache_root() / "kernels")
        if self.weights != "dense":  # the file's blocks serve every call: one copy of the weights, not two
            log.info("dropped the dense copy of the linears: %.0f MB", drop_dense_weights(self.target) / 1e6)
        if compile_wanted(compile):
            self.target.compiled = compile_step(self.target, cache_root() / "compiled", [(1, None)])
            if self.target.compiled is not None:  # it serves decoding: prefills need no oneDNN packed copy
                for module in self.target.modules():
                    if isinstance(module, Linear):
                        module.drop_packed()
        self.tokenizer = Tokenizer.load(resolve_checkpoint(target_path), self.target.config.eos_token_ids)
        self.engine = self.make_engine(mode, draft, k, max_batch_size, ssd)

    def make_engine(self, mode: str, draft=None, k: int = 4, max_batch_size: int = 64, ssd: SSDOptions | None = None,
                    **ssd_changes) -> Engine:
        """An engine of another mode over this LLM's target and tokenizer (benchmarks compare several);
        ssd and ssd_changes as in `LLM`."""
        stop = self.tokenizer.stop_token_ids
        if mode == "ar":
            return AREngine(self.target, stop, max_batch_size=max_batch_size)
        from saguaro.engine.speculative import make_speculative_engine

        engine = make_speculative_engine(mode, self.target, self.tokenizer, draft, k, stop, max_batch_size,
                                         default_draft=embedded_draft_path(), target_path=self.target_path,
                                         ssd=SSDOptions.of(ssd, **ssd_changes))
        compiled = self.target.compiled
        if compiled is not None:  # the verification step, at the threads the target verifies with
            cores = getattr(engine, "cores", None)
            if cores is not None:
                compiled.ensure(1, cores.all_threads)  # AR rounds under auto
            threads = cores.shared_threads if cores is not None else None
            speculator = getattr(engine, "speculator", None)
            shorter = getattr(speculator, "min_confidence", 0) or getattr(speculator, "lookup_min_match", 0)
            shortest = 2 if shorter else k + 1
            for tokens in range(shortest, k + 2):  # a draft that stops early, or a short lookup: fewer tokens
                compiled.ensure(tokens, threads)
        return engine

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists), batched together."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.encode(p, chat) for p in prompts]
        groups = [[self.sequence(i, c) for c in choices(sp)] for i, sp in zip(ids, params)]  # n choices each
        seqs = [s for g in groups for s in g]
        for s in seqs:
            self.engine.check(s)
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="sequences")
            progress = lambda changed: bar.update(sum(s.finished for s in seqs) - bar.n)  # noqa: E731
        self.engine.run(seqs, progress)
        return [self._output(p, g) for p, g in zip(prompts, groups)]

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        ids = self.tokenizer.encode_chat(messages)
        group = [self.sequence(ids, c) for c in choices(sampling_params or SamplingParams())]
        self.engine.run(group)
        return self._output(None, group)

    def sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A request for this LLM's engine, ending at its stop strings (the engine cuts the tokens)."""
        return Sequence(prompt_ids, params, stop_check=StopStrings.for_params(self.tokenizer, params.stop))

    def _output(self, prompt, group: list[Sequence]) -> RequestOutput:
        """One request's output: its n choices, the metrics of the first."""
        outputs = []
        for i, seq in enumerate(group):
            stops = seq.stop_check
            stopped = isinstance(stops, StopStrings) and stops.text is not None
            text = stops.text if stopped else self.tokenizer.decode(seq.output_ids)
            outputs.append(CompletionOutput(text, list(seq.output_ids), seq.finish_reason, i,
                                            None if seq.logprobs is None else list(seq.logprobs)))
        degraded = getattr(self.engine, "degraded", None)  # an SSD engine that lost its worker
        mode = f"{self.mode}-degraded" if degraded else self.mode
        # under auto, the sequence's own metrics say which mode ran
        metrics = {"mode": mode, "dtype": self.dtype, "weights": self.weights,
                   "compiled": self.target.compiled is not None, **group[0].metrics()}
        if degraded:
            metrics["degraded"] = degraded
        return RequestOutput(prompt if isinstance(prompt, str) else None, group[0].prompt_ids, outputs, metrics)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
