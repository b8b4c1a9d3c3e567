"""A GGUF file's quantized weights as they are stored (no dequantizing), named after our modules, for
the kernels that multiply by them directly (models/linear.py `use_file_blocks`).

The file's own format is what llama.cpp runs: read at 0.6 bytes per weight for Q4_1 instead of 2 for
bfloat16. The loader's dequantized copy (loader.py) stays the model's dense weights, used where the
blocks are not (float32 inputs, training, CPUs without the kernels).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saguaro.loader import converted_gguf_dir, unpermute_rope

log = logging.getLogger(__name__)

# GGUF tensor name part -> (our module, index of this tensor among the ones fused into that module).
_FUSED = {"attn_q": ("attn.qkv", 0), "attn_k": ("attn.qkv", 1), "attn_v": ("attn.qkv", 2),
          "attn_output": ("attn.o", 0), "ffn_gate": ("mlp.gate_up", 0), "ffn_up": ("mlp.gate_up", 1),
          "ffn_down": ("mlp.down", 0)}
_PARTS = Counter(module for module, _ in _FUSED.values())  # how many file tensors each module fuses


def read_blocks(gguf_path: Path, formats: tuple[str, ...]) -> dict[str, tuple[str, torch.Tensor]]:
    """Module name -> (format, raw blocks uint8 [out, in / 32 * block bytes]) for every linear of the
    file whose parts are all stored in one of `formats` (gguf's type names in lower case, e.g. "q4_1").
    A tied output head takes the token embedding's blocks.

    Parsing a GGUF's metadata takes seconds (gguf-py reads a 49k-token vocabulary field by field), so
    the first read keeps the blocks under the file's converted directory (loader.converted_gguf_dir);
    later reads load them from there in a fraction of a second."""
    cached = converted_gguf_dir(gguf_path) / "file_blocks" / "blocks.safetensors"  # not among the dense shards
    if cached.is_file():
        with safe_open(str(cached), framework="pt") as f:
            kinds = f.metadata() or {}
            blocks = {name: (kinds[name], f.get_tensor(name)) for name in f.keys() if kinds.get(name) in formats}
    else:
        blocks = _parse_blocks(gguf_path, formats)
        cached.parent.mkdir(exist_ok=True)
        partial = cached.with_name(f"blocks.{os.getpid()}.tmp")
        save_file({name: raw for name, (_, raw) in blocks.items()}, str(partial),
                  metadata={name: fmt for name, (fmt, _) in blocks.items()})
        partial.replace(cached)  # atomic: a crash never leaves a half-written file under the final name
    log.info("%s: %d linears keep the file's blocks (%s)", gguf_path.name, len(blocks),
             ", ".join(sorted({f for f, _ in blocks.values()})) or "none")
    return blocks


def _parse_blocks(gguf_path: Path, formats: tuple[str, ...]) -> dict[str, tuple[str, torch.Tensor]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    heads = reader.fields[f"{arch}.attention.head_count"].contents()
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = kv_field.contents() if kv_field is not None else heads
    parts: dict[str, list] = {}
    head = embedding = None
    for t in reader.tensors:
        fmt = t.tensor_type.name.lower()
        if len(t.data.shape) != 2:
            continue
        raw = (fmt, torch.from_numpy(t.data.copy()) if fmt in formats else None)
        name = t.name.split(".")
        if t.name == "output.weight":
            head = raw
        elif t.name == "token_embd.weight":
            embedding = raw
        elif name[0] == "blk" and name[2] in _FUSED:
            module, index = _FUSED[name[2]]
            if arch == "llama" and name[2] in ("attn_q", "attn_k") and raw[1] is not None:
                # rows, like the loader's dense copy: one block row per output, so the same permutation
                raw = (fmt, unpermute_rope(raw[1], heads if name[2] == "attn_q" else kv_heads).contiguous())
            parts.setdefault(f"layers.{name[1]}.{module}", [None] * _PARTS[module])[index] = raw
    blocks = {}
    for module, pieces in parts.items():
        if all(p is not None and p[1] is not None for p in pieces) and len({p[0] for p in pieces}) == 1:
            blocks[module] = (pieces[0][0], torch.cat([p[1] for p in pieces]))
    output = head if head is not None else embedding
    if output is not None and output[1] is not None:
        blocks["lm_head"] = output
    return blocks


def use_file_weights(model, path: Path, weights: str, kernel_dir: Path) -> str:
    """Have `model` (loaded from `path`) multiply by the file's own blocks where it can; returns what its
    linears multiply by: "dense", or the kernel formats taken (e.g. "q4_1+q8_0", "q4_1_i8+q8_0_i8").

    weights: "dense" keeps the dense copy; "auto" takes the blocks where possible; "file" insists on them;
    "file-int8" insists on them with the activations quantized to int8 per block of 32, as llama.cpp
    does (faster, and further from float32: benchmarks/activation_quality.py).
    """
    from saguaro.models import cpu_kernels
    from saguaro.models.linear import use_file_blocks

    if weights == "dense":
        return "dense"
    why_not = None
    if path.suffix.lower() != ".gguf":
        why_not = f"{path} is not a .gguf file"
    elif model.dtype != torch.bfloat16:
        dtype = str(model.dtype).removeprefix("torch.")
        why_not = f"the model runs in {dtype} (the block kernels take bfloat16 activations)"
    elif not cpu_kernels.load(kernel_dir):
        why_not = "saguaro's CPU kernels need AVX512_BF16 and a C++ compiler"
    elif weights == "file-int8" and not cpu_kernels.int8_supported():
        why_not = "int8 activations need AVX512_VNNI"
    blocks = {} if why_not else read_blocks(path, cpu_kernels.BLOCK_FORMATS)
    taken = use_file_blocks(model, blocks, kernel_dir, int8_activations=weights == "file-int8") if blocks else []
    if not taken:
        why_not = why_not or "the file stores none of its linears in Q4_1 or Q8_0"
        if weights != "auto":
            raise ValueError(f"weights={weights!r} is not possible here: {why_not}")
        log.info("dense weights: %s", why_not)
        return "dense"
    suffix = cpu_kernels.INT8 if weights == "file-int8" else ""
    return "+".join(sorted({blocks[name][0] + suffix for name in taken}))


def quantized_blocks(model, fmt: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Module name -> (fmt, raw blocks) of every linear of `model` (bar one sharing the embedding
    matrix), quantized the way llama.cpp writes a GGUF (gguf.quants): `read_blocks`' result for a model
    that came as dense weights. ~0.1 s for 12 M weights."""
    from gguf import GGMLQuantizationType, quants

    from saguaro.models.linear import Linear, embedding_matrices

    embeddings = embedding_matrices(model)
    kind = GGMLQuantizationType[fmt.upper()]
    return {name: (fmt, torch.from_numpy(quants.quantize(m.weight.detach().float().numpy(), kind)))
            for name, m in model.named_modules()
            if isinstance(m, Linear) and m.in_features % 32 == 0 and m.weight.data_ptr() not in embeddings}
