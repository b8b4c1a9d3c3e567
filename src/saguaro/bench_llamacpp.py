"""The llama.cpp peer in `saguaro bench` (through llama-cpp-python): mode `llamacpp` runs the very GGUF
file our target was loaded from (the embedded SmolLM2 Q4_1 by default), mode `llamacpp-f32` the same
weights requantized to F32.

Why F32 too: with Q4_1 weights llama.cpp multiplies in the quantized domain (activations rounded to
8 bits), so its logits differ from ours, which dequantize the weights once and compute in float32.
The F32 file holds exactly those dequantized values, so both engines then do the same arithmetic up
to summation order. It is written once by llama.cpp's own `llama_model_quantize` (ftype ALL_F32,
requantizing allowed: Q4_1/Q8_0 tensors are dequantized, F32 ones copied) and cached under
~/.cache/saguaro/llamacpp, keyed by the source file's SHA-256.

Decoding matches the other modes: the prompt's token ids are fed as they are (llama.cpp tokenizes
nothing, so no second BOS), at most max_tokens, stop at our stop tokens (kept in the output) unless
ignore_eos, the target's thread count. Greedy at T=0; at T>0 llama.cpp's own sampler chain, seeded
per prompt (its chain applies top-k/top-p before the temperature; the bench sets neither). Every
prompt is prefilled in full: llama-cpp-python would otherwise reuse the KV cache of a shared prefix
(the chat template's system prompt) from the previous prompt, which no other mode does.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time
from pathlib import Path

from saguaro.sampling import SamplingParams

log = logging.getLogger(__name__)

MODES = ("llamacpp", "llamacpp-f32")
MISSING = "llamacpp mode needs llama-cpp-python: run 'make peers' (builds it from PyPI's sdist, ~8 min)"
CACHE_DIR = Path.home() / ".cache" / "saguaro" / "llamacpp"


def import_llama_cpp():
    """The llama_cpp module, or the one-line error the CLI reports (exit status 2)."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(MISSING) from None
    # llama.cpp logs every tensor of a load or quantization to stderr unless this logger is raised
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


def gguf_source(target_path) -> Path:
    path = Path(target_path)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise ValueError(f"llamacpp modes run the target's GGUF file, but the target is not a .gguf file: {path}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def f32_gguf(source: Path, cache_dir: Path | None = None, threads: int = 1) -> Path:
    """`source` with every weight in F32, made once by llama.cpp's quantizer and cached."""
    llama_cpp = import_llama_cpp()
    cache_dir = Path(cache_dir or CACHE_DIR)
    out = cache_dir / f"{source.stem}.{file_sha256(source)[:16]}.F32.gguf"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # renamed when complete: no half-written cache hit
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = threads
    # tied embeddings/output would otherwise get llama.cpp's "output tensor" type (Q6_K)
    params.output_tensor_type = params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    log.info("writing %s (F32 of %s)", out, source)
    llama_cpp.llama_backend_init()
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama.cpp could not write an F32 copy of {source} (status {status})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def sampler_kwargs(params: SamplingParams) -> dict:
    """Arguments of `Llama.generate`: only the named filters on, no repetition penalty."""
    if params.greedy:
        return dict(temp=0.0, repeat_penalty=1.0)
    return dict(temp=float(params.temperature), top_k=max(params.top_k, 0), top_p=float(params.top_p),
                min_p=0.0, typical_p=1.0, repeat_penalty=1.0)


class LlamaCppRunner:
    """Generates prompts one at a time with llama.cpp; returns per-prompt output ids."""

    def __init__(self, model_path: Path, stop_ids: set[int], threads: int, n_ctx: int):
        llama_cpp = import_llama_cpp()
        self.model_path = Path(model_path)
        self.stop_ids = set(stop_ids)
        self.llama = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads,
                                     n_threads_batch=threads, verbose=False)
        log.info("llama.cpp on %s, %d threads", model_path, threads)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        self.last_ttfts: list[float] = []  # seconds to each prompt's first token (its prefill)
        return [self._generate(p, sp) for p, sp in zip(prompts, params)]

    def _generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        self.llama.reset()  # forget the previous prompt: no prefix reuse
        if params.seed is not None:
            self.llama.set_seed(params.seed)
        out: list[int] = []
        start = time.perf_counter()
        for token in self.llama.generate(list(prompt), **sampler_kwargs(params)):
            if not out:
                self.last_ttfts.append(time.perf_counter() - start)
            out.append(int(token))
            if len(out) >= params.max_tokens or (token in self.stop_ids and not params.ignore_eos):
                break
        return out

    def close(self) -> None:
        self.llama.close()


def make_runner(mode: str, target_path, stop_ids: set[int], threads: int, n_ctx: int) -> LlamaCppRunner:
    import_llama_cpp()
    path = gguf_source(target_path)
    if mode == "llamacpp-f32":
        path = f32_gguf(path, threads=threads)
    return LlamaCppRunner(path, stop_ids, threads, n_ctx)
