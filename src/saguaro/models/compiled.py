"""The target's small forwards (a decode step, a K+1 verification) compiled ahead of time for this CPU.

AOTInductor turns the whole step (embedding, every layer's projections and MLP, norms, output head)
into one shared library per (query count, thread count). Where saguaro's CPU kernels load
(models/cpu_kernels.py: AVX512_BF16 and a C++ compiler), the library calls them directly through C
shims: the bfloat16 linears and the cache write + attention. The linears then read one packed weight
the eager model and every library share (no copy in the library), and five tokens cost about what one
does. Elsewhere (float32, other CPUs) inductor's own C++ GEMMs run over weights it packs into the
library, and the attention is the Python custom op `saguaro::cached_attention`. Either way the cache
write and attention stay outside the graph's shapes, so one library serves every cache length with
no recompilation; other shapes (prefills, batches, draft trees) run eager.

Exactness: with inductor rounding half-precision intermediates where eager would
(`emulate_precision_casts`), row-count invariant linears and order-free attention, a token's logits
from the 5-token library equal bitwise those from the 1-token one (tests/test_compiled.py), so greedy
SD and SSD stay token-identical to AR on the compiled path.

A library is built once per (weights, dtype, code, torch, CPU, thread count), in about 30 s with the
kernels or 1-2 min without, and kept under the user's cache directory; later starts load it in
about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from saguaro.models import attention as attention_module
from saguaro.models import cpu_kernels
from saguaro.models import layers as layers_module
from saguaro.models import linear as linear_module
from saguaro.models.linear import Linear, use_kernels
from saguaro.models.attention import cached_attention, kernel_applies

log = logging.getLogger(__name__)



class _Step(nn.Module):
    """One forward of `model` over explicit tensors (everything a graph needs, nothing it must guess)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, cos, sin, slots, mask, logits_at, k_cache, v_cache):
        m = self.model
        b, t = ids.shape
        h = m.embed(ids)
        for i, layer in enumerate(m.layers):
            q, k, v = layer.attn.project(layer.attn_norm(h), cos, sin)
            # saguaro's C++ attention where loaded (no call back into Python), else the Python custom op
            attend = torch.ops.saguaro_cpu.cached_attention if kernel_applies(q) else cached_attention
            out = attend(q, k, v, k_cache, v_cache, i, slots, mask)
            h = h + layer.attn.o(out.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.mlp_norm(h))
        h = m.norm(torch.gather(h, 1, logits_at[:, :, None].expand(-1, -1, h.shape[-1])))
        return m.lm_head(h).float(), h  # the states too: a feature draft reads them


@dataclass
class StepStats:
    compiled_calls: int = 0
    build_s: float = 0.0  # seconds spent compiling in this process (0 when loaded from the cache)
    load_s: float = 0.0


class CompiledStep:
    """The compiled libraries of one model, one per (query count, torch threads): a decode step, a
    K+1 verification, each for one sequence at a time. The thread count is baked into a library's
    GEMM blocking, so AR with every core and SSD's target on its share of them use different ones.
    `accepts` says whether a call has a library; the model runs eager otherwise."""

    def __init__(self, model: nn.Module, cache_dir: Path, progress: bool = True):
        self.cache_dir = cache_dir
        self.progress = progress
        self.key = fingerprint(model)
        self.paths: list[Path] = []
        self.stats = StepStats()
        self._model = model
        self._runners: dict[tuple[int, int], object] = {}
        self.shared_weights = kernel_linears(model)  # libraries use the model's tensors, no copy

    def ensure(self, tokens: int, threads: int | None = None) -> bool:
        """Load (or build, minutes, once per machine) the library for `tokens` queries at `threads`
        torch threads (default: the current count). False, with a warning, where it cannot be built."""
        threads = threads or torch.get_num_threads()
        if (tokens, threads) in self._runners:
            return True
        path = self.cache_dir / f"{self.key}-t{tokens}-j{threads}{'-shared' if self.shared_weights else ''}.pt2"
        try:
            if not path.exists():
                t0 = time.perf_counter()
                what = f"compiling the model for this CPU ({tokens}-token step, {threads} threads), once"
                with _progress_line(what, self.progress), _num_threads(threads):
                    _build(self._model, path, tokens)
                self.stats.build_s += time.perf_counter() - t0
                log.info("built the %d-token step in %.0fs: %s", tokens, time.perf_counter() - t0, path)
                prune(self.cache_dir)
            os.utime(path)  # last used now: pruning keeps the recently used libraries
            t0 = time.perf_counter()
            runner = torch._inductor.aoti_load_package(str(path))
            if self.shared_weights:
                runner.load_constants(self._constants(runner.get_constant_fqns()), check_full_update=True,
                                      user_managed=True)
            self._runners[tokens, threads] = flat_call(runner, inputs=8)
            self.stats.load_s += time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - any failure leaves the (always correct) eager forward
            log.warning("no compiled %d-token step, running eager: %s", tokens, str(exc).splitlines()[0][:300])
            return False
        self.paths.append(path)
        return True

    def _constants(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The library's weights are the model's own tensors (user-managed, not copied): every library
        and the eager forward share one copy, packed or not."""
        step = _Step(self._model)
        tensors = {**dict(step.named_parameters(remove_duplicate=False)), **dict(step.named_buffers(remove_duplicate=False))}
        return {name: tensors[name].detach() for name in names}

    def accepts(self, rows: int, tokens: int) -> bool:
        return rows == 1 and (tokens, torch.get_num_threads()) in self._runners

    def __call__(self, ids, cos, sin, slots, mask, logits_at, k_cache, v_cache
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 logits, final-norm hidden states) at the `logits_at` positions."""
        self.stats.compiled_calls += 1
        args = (ids, cos, sin, slots, mask, logits_at, k_cache, v_cache)
        return self._runners[ids.shape[1], torch.get_num_threads()](*(a.contiguous() for a in args))


def flat_call(runner, inputs: int):
    """`runner` (a loaded AOTInductor package) as a function of its `inputs` tensors, positional. The
    package's own __call__ flattens its arguments and unflattens its outputs through pytree on every
    call (~0.05-0.1 ms of a ~5 ms step on this CPU); this calls the library with the list it wants.
    Where the library's input spec is not a flat tuple of that many tensors, the package's call."""
    from torch.utils import _pytree as pytree

    try:
        in_spec, out_spec = (pytree.treespec_loads(spec) for spec in runner.loader.get_call_spec())
        flat = pytree.tree_flatten((tuple(range(inputs)), {}))[1] == in_spec
    except (AttributeError, RuntimeError, ValueError):  # another package layout: its own call
        flat = False
    if not flat:
        return runner
    run = runner.loader.boxed_run
    return lambda *tensors: pytree.tree_unflatten(run(list(tensors)), out_spec)


KEEP_LIBRARIES = 16  # SD verifies over 2..K+1 tokens, one library each, per thread count
KEEP_BYTES = 4 << 30  # a library that copies its weights is large (1 GB for the float32 embedded target)


def prune(cache_dir: Path, keep: int = KEEP_LIBRARIES, keep_bytes: int = KEEP_BYTES) -> list[Path]:
    """Delete all but the `keep` most recently used libraries, and any beyond `keep_bytes` in all: a
    new weight file, dtype, thread count or saguaro version makes new ones, and the old would pile up."""
    libraries = sorted(cache_dir.glob("*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
    total, removed = 0, []
    for i, library in enumerate(libraries):
        total += library.stat().st_size
        if i >= keep or (i > 0 and total > keep_bytes):
            library.unlink(missing_ok=True)
            removed.append(library)
            log.info("removed a compiled library not used recently: %s", library.name)
    return removed


def fingerprint(model: nn.Module) -> str:
    """Everything a library depends on but its thread count: the weights' bytes (and the file blocks
    linears multiply by), dtype, the code it was traced from, torch and the CPU."""
    digest = hashlib.blake2b(digest_size=16)
    for module in (attention_module, layers_module, linear_module, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    for source in (*cpu_kernels.SOURCES, *cpu_kernels.HEADERS):
        digest.update(source.read_bytes())
    meta = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "config": repr(model.config)}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    blocks = {name: m for name, m in model.named_modules() if getattr(m, "block_weight", None) is not None}
    digest.update(json.dumps({name: m.block_format for name, m in blocks.items()}, sort_keys=True).encode())
    for name, tensor in sorted([*model.state_dict().items(),
                                *((f"{n}.block_weight", m.block_weight) for n, m in blocks.items())]):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def compile_step(model: nn.Module, cache_dir: Path, plan: list[tuple[int, int | None]] = ((1, None),),
                 progress: bool = True) -> CompiledStep | None:
    """The model's compiled step for each (query count, threads) in `plan`, built now (a minute or
    two each, once per machine) or loaded from `cache_dir` (about a second). None where the first
    cannot be built here (no C++ compiler, an unsupported model, not a CPU): the caller keeps the
    eager forward, which is always correct."""
    if model.device.type != "cpu":
        return None
    use_kernels(model, cache_dir.parent / "kernels")
    step = CompiledStep(model, cache_dir, progress)
    for tokens, threads in plan:
        if not step.ensure(tokens, threads):
            return None if not step.paths else step
    return step


def kernel_linears(model: nn.Module) -> bool:
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return bool(linears) and all(m.kernel_weight is not None or m.block_weight is not None for m in linears)


@contextlib.contextmanager
def _num_threads(threads: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def example_inputs(model: nn.Module, tokens: int, kv: int = 64):
    cache = model.new_cache(1, kv + 64)
    positions = kv + torch.arange(tokens)[None]
    span = -(-(kv + tokens) // 32) * 32
    mask = (torch.arange(span) <= positions[:, :, None])[:, None]
    cos, sin = model.rotary(positions, kv + tokens, model.dtype)
    ids = torch.zeros(1, tokens, dtype=torch.long)
    logits_at = torch.arange(tokens)[None]
    return ids, cos, sin, positions, mask, logits_at, cache.k, cache.v


# Weights frozen in and packed at build time; every GEMM by inductor's C++ micro-kernel ("CPP" only:
# with "ATEN" allowed, autotuning on a busy 2-core machine picked unpacked aten mm for the 5-token step,
# 1.2x slower); half-precision intermediates rounded where eager rounds them, so the 1-token and the
# K+1-token libraries give a token bitwise the same logits whatever each fuses.
INDUCTOR_CONFIGS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
                    "emulate_precision_casts": True}


def _build(model: nn.Module, path: Path, tokens: int) -> None:
    """Export the step with its row and query counts fixed (inductor's GEMMs are fastest for the row
    count they were tuned for) and everything that grows dynamic: cache span, capacity, logits wanted."""
    import torch._inductor

    dim = torch.export.Dim
    span, capacity = dim("span", min=1, max=1 << 20), dim("capacity", min=1, max=1 << 20)
    wanted = dim("wanted", min=1, max=tokens) if tokens > 1 else None
    shapes = (None, None, None, None, {3: span}, {1: wanted} if wanted else None, {3: capacity}, {3: capacity})
    with torch.no_grad():
        program = torch.export.export(_Step(model).eval(), example_inputs(model, tokens), dynamic_shapes=shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    configs = dict(INDUCTOR_CONFIGS)
    if shims := cpu_kernels.aoti_shims():
        configs["aot_inductor.custom_ops_to_c_shims"] = shims
    # With every linear on our kernel the graph packs nothing of its own: the weights stay out of the
    # library and it is handed the model's tensors at load (`CompiledStep._constants`).
    configs["aot_inductor.package_constants_in_so"] = not kernel_linears(model)
    torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=configs)
    partial.replace(path)  # atomic: a crash never leaves a half-written library under the final name


class _progress_line:
    """A line counting the seconds of a long opaque call (the compile has no finer progress to show)."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled = what, enabled
        self._done = threading.Event()

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.what, bar_format="{desc}: {elapsed}", leave=True)
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def _tick(self):
        while not self._done.wait(1.0):
            self._bar.refresh()

    def __exit__(self, *exc):
        if self.enabled:
            self._done.set()
            self._thread.join()
            self._bar.close()
