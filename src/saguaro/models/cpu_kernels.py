"""Our C++ CPU kernels (models/csrc/), built once per machine with the system's C++ compiler and loaded
as torch ops.

- `saguaro_cpu::packed_linear`: the bfloat16 linear for decode-sized calls: one sequential pass over a
  packed weight for up to 6 rows, each output summed in an order that does not depend on the row count
  (csrc/dot_linear.cpp says why torch's kernels could not serve).
- `saguaro_cpu::q4_1_linear`, `q8_0_linear`: the same for weights kept in a GGUF file's own block
  formats, read at 0.6-1.1 bytes per weight, the activations never quantized (csrc/block_linear.cpp).
- `saguaro_cpu::cached_attention`: the cache write and the attention of a few queries, float32 or
  bfloat16, each query's output independent of the queries and masked keys around it
  (csrc/attention.cpp).

Both serve the compiled step (models/compiled.py) and the eager forward's decode-sized calls.

A build takes ~10 s and is kept under the cache directory, keyed by the source, torch and the compiler
flags. Where the CPU lacks AVX512_BF16 or no compiler works, `load` returns False and callers keep
torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("dot_linear.cpp", "block_linear.cpp", "int8_block_linear.cpp", "attention.cpp", "shims.cpp")]
HEADERS = [Path(__file__).with_name("csrc") / "block_tiles.h"]  # in the build's key, not on its command line
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp",
         "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"]


def supported() -> bool:
    """Whether this CPU has what the kernels are written for: AVX-512 with VDPBF16PS (AVX512_BF16)."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


@functools.cache
def load(cache_dir: Path) -> bool:
    """Build (seconds, once per machine) and load the kernels; False, with a warning, where they cannot be."""
    if loaded():
        return True
    if not supported():
        return False
    try:
        library = _build(cache_dir)
        ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)  # global: compiled steps link to its C shims at load
        torch.ops.load_library(str(library))
    except Exception as exc:  # noqa: BLE001 - any failure leaves torch's kernels, which are always correct
        log.warning("no saguaro CPU kernels, using torch's: %s", str(exc).splitlines()[0][:300])
        return False
    torch.library.register_fake("saguaro_cpu::pack_weight")(_packed_shape)
    torch.library.register_fake("saguaro_cpu::packed_linear")(_linear_shape)
    torch.library.register_fake("saguaro_cpu::cached_attention")(_attention_shape)
    for fmt in KERNEL_FORMATS:
        torch.library.register_fake(f"saguaro_cpu::{fmt}_linear")(_linear_shape)
    return True


def loaded() -> bool:
    return hasattr(torch.ops, "saguaro_cpu") and hasattr(torch.ops.saguaro_cpu, "cached_attention")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16 -> the kernel's layout [ceil(N/4), ceil(K/32), 4, 32] (a copy, zero padded)."""
    return torch.ops.saguaro_cpu.pack_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return torch.ops.saguaro_cpu.packed_linear(x, packed, out_features)


# GGUF block formats the kernels read as they are (by gguf's GGMLQuantizationType name).
BLOCK_FORMATS = ("q4_1", "q8_0")
# Suffix of a kernel format whose activations are quantized to int8 (csrc/int8_block_linear.cpp):
# "q4_1_i8" multiplies by the same Q4_1 blocks as "q4_1", with VPDPBUSD.
INT8 = "_i8"
KERNEL_FORMATS = (*BLOCK_FORMATS, *(f"{fmt}{INT8}" for fmt in BLOCK_FORMATS))  # each has its op and pack op


def int8_supported() -> bool:
    """Whether this CPU has VPDPBUSD on 512-bit registers (AVX512_VNNI), which the int8 path needs."""
    return supported() and bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def pack_blocks(fmt: str, raw: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor's blocks, uint8 [N, K / 32 * block bytes] as in the file, -> the kernel's layout."""
    return getattr(torch.ops.saguaro_cpu, f"pack_{fmt}")(raw.contiguous())


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def on_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` side by side in one allocation that Linux is asked to back with 2 MB pages
    (madvise MADV_HUGEPAGE, which works where transparent huge pages are "madvise" or "always"). A
    weight streamed from memory then crosses a page, and pays a TLB miss, every 2 MB instead of every
    4 KB: the block linears of the embedded target took 7.3-8.3 ms per token instead of 8.1-9.9 (one
    thread, AMD EPYC). Where madvise is not there, the copies are ordinary memory."""
    if not tensors:
        return []
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 64) * 64
    arena = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    start = -arena.data_ptr() % HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        length = (arena.numel() - start) // HUGE_PAGE * HUGE_PAGE
        libc.madvise(ctypes.c_void_p(arena.data_ptr() + start), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    except (OSError, AttributeError):  # not Linux: ordinary pages
        pass
    copies = []
    for t, offset in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        view = arena[start + offset: start + offset + nbytes].view(t.dtype).view(t.shape)
        copies.append(view.copy_(t))
    return copies


def block_linear(fmt: str, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return _block_op(fmt)(x, packed, out_features)


@functools.cache
def _block_op(fmt: str):
    """The op for `fmt`, looked up once (eager batches call it for every linear of every step)."""
    return getattr(torch.ops.saguaro_cpu, f"{fmt}_linear")


def aoti_shims() -> dict:
    """`aot_inductor.custom_ops_to_c_shims` for our ops (csrc/shims.cpp): a compiled step calls them
    directly instead of through AOTInductor's proxy executor."""
    if not loaded():
        return {}
    handle = "AtenTensorHandle"
    return {
        torch.ops.saguaro_cpu.packed_linear.default: [
            f"AOTITorchError aoti_torch_cpu_packed_linear({handle} x, {handle} packed, int64_t n, {handle}* out)"],
        **{getattr(torch.ops.saguaro_cpu, f"{fmt}_linear").default: [
            f"AOTITorchError aoti_torch_cpu_{fmt}_linear({handle} x, {handle} packed, int64_t n, {handle}* out)"]
           for fmt in KERNEL_FORMATS},
        torch.ops.saguaro_cpu.cached_attention.default: [
            f"AOTITorchError aoti_torch_cpu_cached_attention({handle} q, {handle} k, {handle} v, {handle} k_cache, "
            f"{handle} v_cache, int64_t layer, {handle} slots, {handle} mask, {handle}* out)"],
    }


def _packed_shape(weight):
    n, k = weight.shape
    return weight.new_empty((-(-n // 4), -(-k // 32), 4, 32))


def _linear_shape(x, packed, n):
    return x.new_empty((*x.shape[:-1], n))


def _attention_shape(q, k, v, k_cache, v_cache, layer, slots, mask):
    return q.new_empty(q.shape)  # contiguous, like the real output


def _build(cache_dir: Path) -> Path:
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    compiler = os.environ.get("CXX", "g++")
    digest = hashlib.blake2b(digest_size=12)
    for part in (*(p.read_bytes() for p in (*SOURCES, *HEADERS)), torch.__version__.encode(), " ".join([compiler, abi, *FLAGS]).encode()):
        digest.update(part)
    library = cache_dir / f"saguaro_cpu-{digest.hexdigest()}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    libdir = str(Path(torch.__file__).parent / "lib")
    partial = library.with_name(f"{library.stem}.{os.getpid()}.tmp.so")
    command = [compiler, *FLAGS, abi, *(f"-I{p}" for p in cpp_extension.include_paths()), *map(str, SOURCES),
               "-o", str(partial), f"-L{libdir}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libdir}"]
    log.info("building saguaro's CPU kernels (once per machine): %s", library.name)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
    partial.replace(library)  # atomic: a crash never leaves a half-written library under the final name
    return library
