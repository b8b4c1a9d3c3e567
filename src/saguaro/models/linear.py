"""nn.Linear that multiplies through oneDNN's prepacked weights for float32 (and, on CPUs with native
bfloat16, bfloat16) inference on a CPU.

Speculative decoding pays off only if verifying K+1 tokens costs about what one token does. torch's
default float32 CPU matmul (MKL sgemm) loses that on some CPUs: measured on an AMD EPYC with AVX-512 at one
thread, a 1536x576 layer takes 0.05 ms for 1 row but 0.19 ms for 5 rows, while oneDNN with the weight
prepacked takes 0.05-0.06 ms for both, and the 49k-token output head drops from 7.2 to 3.9 ms even for
1 row. So inference forwards (no autograd) on CPU float32 use a packed copy of the weight, made on
first use and remade whenever the weight changes in place (training); everything else is nn.Linear.
The packed copy doubles the memory of the linear weights; `torch.backends.mkldnn.flags(enabled=False)`
turns the path off.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from saguaro.models import cpu_kernels

_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX), so bf16 halves the bytes
    read per token without an emulation cost."""
    cpu = torch.cpu
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return _MKLDNN and native


_PACKED_DTYPES = (torch.float32, torch.bfloat16) if native_bf16() else (torch.float32,)


# Calls of up to this many rows (a decode step, a verification, a few draft branches) go to our bf16
# kernel where the layer has its packed weight: it gives a row the same bits whatever the row count.
KERNEL_MAX_ROWS = 16


class Linear(nn.Linear):
    _packed: torch.Tensor | None = None
    _packed_version: int = -1
    _kernel_version: int = -1
    prepack: bool = True  # False: no oneDNN packed copy
    kernel_weight: torch.Tensor | None  # the weight in saguaro_cpu's layout (`pack_for_kernel`)
    block_weight: torch.Tensor | None  # the weight as a GGUF file's blocks, packed (`use_blocks`)
    block_format: str | None = None
    dense_dropped: bool = False  # `drop_dense_weights`: the blocks are the only copy

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("block_weight", None, persistent=False)

    def use_blocks(self, fmt: str, raw: torch.Tensor) -> None:
        """Multiply bfloat16 inputs by the weight exactly as a GGUF file stores it (`fmt`, one of
        cpu_kernels.BLOCK_FORMATS; `raw` its blocks, uint8 [out, in / 32 * block bytes]), read at the
        file's bytes per weight. The dense `weight` (the file's values, dequantized) still serves float32
        inputs and training."""
        self.block_weight = cpu_kernels.pack_blocks(fmt, raw)
        self.block_format = fmt
        self.kernel_weight = None  # bf16 calls all go to the blocks

    def pack_for_kernel(self) -> bool:
        """Give the layer the weight in saguaro_cpu's layout (a copy) for decode-sized calls; False where
        the kernel does not apply (not bfloat16 on a CPU, kernels not loaded)."""
        if self.block_weight is not None:
            return True  # the file's blocks serve every bfloat16 call
        if not (cpu_kernels.loaded() and self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu"):
            return False
        packed = cpu_kernels.pack_weight(self.weight)
        if self.kernel_weight is not None and self.kernel_weight.shape == packed.shape:
            self.kernel_weight.copy_(packed)  # in place: compiled steps hold this very tensor
        else:
            self.kernel_weight = packed
        self._kernel_version = _version(self.weight)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block_weight is not None and x.dtype == torch.bfloat16 and not self._training(x):
            out = cpu_kernels.block_linear(self.block_format, x, self.block_weight, self.out_features)
            return out if self.bias is None else out + self.bias
        if self.dense_dropped:
            raise RuntimeError("this linear keeps only the GGUF file's blocks (its dense copy was dropped to "
                               "save memory): it multiplies bfloat16 inputs at inference only")
        if self.kernel_weight is not None and self._use_kernel(x):
            if not _tracing() and self._kernel_version != _version(self.weight):  # trained in place since
                self.pack_for_kernel()
            out = cpu_kernels.packed_linear(x, self.kernel_weight, self.out_features)
            return out if self.bias is None else out + self.bias
        if not self._use_packed(x):
            return F.linear(x, self.weight, self.bias)
        version = _version(self.weight)
        if self._packed is None or self._packed_version != version:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._packed_version = version
        if x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
            return _one_row(x, self._packed, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def _training(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and not self._training(x) and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]

    def _use_packed(self, x: torch.Tensor) -> bool:
        return (self.prepack and not _tracing() and x.device.type == "cpu" and x.dtype in _PACKED_DTYPES and self.weight.dtype == x.dtype
                and not torch.is_grad_enabled() and _MKLDNN and torch.backends.mkldnn.enabled)

    def drop_packed(self) -> None:
        """Stop packing (and free any packed copy): the eager forward then serves only calls of many
        rows, where packing gains little."""
        self.prepack = False
        self._packed, self._packed_version = None, -1

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: any packed copy is stale
        if self.dense_dropped:
            raise RuntimeError("cannot convert a linear whose dense weights were dropped (it keeps only the "
                               "GGUF file's blocks); load the model again")
        self._packed, self._packed_version = None, -1
        self.kernel_weight = None
        self.block_weight, self.block_format = None, None
        return super()._apply(fn, recurse)


def use_file_blocks(model: nn.Module, blocks: dict[str, tuple[str, torch.Tensor]], kernel_dir: Path,
                    int8_activations: bool = False) -> list[str]:
    """Give the model's linears their weights as a GGUF file stores them (`blocks`: module name ->
    (format, raw blocks), as `saguaro.gguf_blocks.read_blocks` returns), for bfloat16 models on CPUs
    where saguaro's kernels load. Returns the names of the linears that took them.

    int8_activations: multiply with the activations quantized to int8 per block of 32, as llama.cpp
    does (csrc/int8_block_linear.cpp; needs AVX512_VNNI), instead of in bfloat16."""
    if model.dtype != torch.bfloat16 or model.device.type != "cpu" or not cpu_kernels.load(kernel_dir):
        return []
    if int8_activations and not cpu_kernels.int8_supported():
        return []
    suffix = cpu_kernels.INT8 if int8_activations else ""
    taken = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name in blocks and blocks[name][0] in cpu_kernels.BLOCK_FORMATS:
            fmt, raw = blocks[name]
            whole_blocks = module.in_features % 32 == 0 and raw.shape[1] % (module.in_features // 32) == 0
            if raw.shape[0] == module.out_features and whole_blocks:
                module.use_blocks(fmt + suffix, raw)
                taken[name] = module
    packed = cpu_kernels.on_huge_pages([module.block_weight for module in taken.values()])
    for module, tensor in zip(taken.values(), packed):
        module.block_weight = tensor
    return list(taken)


def embedding_matrices(model: nn.Module) -> set[int]:
    """The storage of every embedding matrix in `model` (a head tied to one shares it)."""
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}


def drop_dense_weights(model: nn.Module) -> int:
    """Free the dense copy of every linear that multiplies by a GGUF file's blocks, so the model holds
    one copy of its weights (the packed blocks); a head tied to the embeddings keeps its matrix, which
    the embedding lookup needs. Afterwards those linears serve bfloat16 inference only. Returns the
    bytes freed."""
    embeddings = embedding_matrices(model)
    freed = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.block_weight is not None and not module.dense_dropped \
                and module.weight.data_ptr() not in embeddings:
            freed += module.weight.numel() * module.weight.element_size()
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
            module._packed, module.kernel_weight = None, None
            module.dense_dropped = True
    return freed


def use_kernels(model: nn.Module, kernel_dir: Path) -> bool:
    """Load saguaro's CPU kernels (models/cpu_kernels.py: attention for every dtype, eager and compiled)
    and route the model's bfloat16 linears through its kernel for decode-sized calls. False where the
    linears keep torch's kernels (float32, no AVX512_BF16, no compiler)."""
    if not cpu_kernels.load(kernel_dir) or model.dtype != torch.bfloat16:
        return False
    return all([m.pack_for_kernel() for m in model.modules() if isinstance(m, Linear)])


def _tracing() -> bool:
    """Under torch.compile or export the graph gets the plain weight (inductor packs its own copy)."""
    return torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()


def _one_row(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row, multiplied as the first of two. oneDNN's bfloat16 kernel for a single row sums in
    another order than its kernel for 2+ rows (measured: the 1536-wide down projection on an AMD
    EPYC with AVX512_BF16), and bf16 rounding makes that visible: greedy SD, verifying K+1 rows,
    would then drift from AR's one row per step. Every row count from 2 up agrees bitwise; the
    padding row costs ~2 us per layer."""
    flat = x.reshape(1, x.shape[-1])
    two = torch.cat([flat, flat])
    out = torch.ops.mkldnn._linear_pointwise(two, packed, bias, "none", [], "")[:1]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _version(weight: torch.Tensor) -> int:
    """The in-place update count; weights made under inference_mode have none (and are never trained)."""
    return 0 if weight.is_inference() else weight._version
