"""Load checkpoints: an HF directory (config.json + safetensors) or a single GGUF file.

A GGUF file is converted once into an HF-style directory under the user's cache
(dequantized safetensors + config.json + tokenizer files); later loads read that directory.
Nothing here unpickles: weights come only from safetensors or GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saguaro.config import ModelConfig
from saguaro.models.layers import rope_inv_freq
from saguaro.models.feature_draft import FEATURE_DRAFT_KEY, FEATURE_FUSE, FeatureDraft
from saguaro.models.transformer import CausalLM

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1
EMBEDDINGS = "model.embed_tokens.weight"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of an unsupported kind."""


def cache_root() -> Path:
    base = os.environ.get("SAGUARO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "saguaro"
    )
    return Path(base)


# ----------------------------------------------------------------------------- HF directories

def read_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory or a .gguf file)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory; floating ones converted to `dtype` one by one as they are read
    (so a float32 checkpoint loaded in bfloat16 is never whole in memory twice)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:  # sharded or not: every shard holds disjoint names
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    tensor = sf.get_tensor(name)
                    convert = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
                    tensors[name] = tensor.to(dtype) if convert else tensor
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    return tensors


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of an HF directory, read alone (the others stay on disk)."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                if name in sf.keys():
                    return sf.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    raise CheckpointError(f"{path}: checkpoint lacks tensor {name!r}")


def load_embeddings(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> tuple[torch.Tensor, int]:
    """A checkpoint's input embeddings and vocabulary size, without loading the rest of it
    (what a draft that borrows its target's embeddings needs of the target)."""
    p = resolve_checkpoint(path)
    try:
        vocab = ModelConfig.from_hf(read_hf_config(p)).vocab_size
    except KeyError as e:
        raise CheckpointError(f"{p}: config.json lacks {e}") from None
    return read_tensor(p, EMBEDDINGS).to(device=device, dtype=dtype), vocab


def to_internal_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to our modules, fusing q/k/v and gate/up into single matmuls."""
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        try:
            return hf.pop(name)
        except KeyError:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}") from None

    if EMBEDDINGS in hf:  # absent from drafts that borrow the target's embeddings
        out["embed.weight"] = take(EMBEDDINGS)
    out["norm.weight"] = take("model.norm.weight")
    if "lm_head.weight" in hf:
        out["lm_head.weight"] = take("lm_head.weight")
    elif not config.tie_embeddings or config.output_token_ids:
        raise CheckpointError("checkpoint lacks lm_head.weight and does not tie embeddings")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[f"layers.{i}.attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        out[f"layers.{i}.attn.qkv.weight"] = torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"])
        if config.attention_bias:
            out[f"layers.{i}.attn.qkv.bias"] = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
        out[f"layers.{i}.attn.o.weight"] = take(a + "o_proj.weight")
        if config.qk_norm:
            out[f"layers.{i}.attn.q_norm.weight"] = take(a + "q_norm.weight")
            out[f"layers.{i}.attn.k_norm.weight"] = take(a + "k_norm.weight")
        m = p + "mlp."
        out[f"layers.{i}.mlp.gate_up.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
        out[f"layers.{i}.mlp.down.weight"] = take(m + "down_proj.weight")
    hf.pop("lm_head.weight", None)
    if FEATURE_FUSE in hf:  # a feature-conditioned draft (models/feature_draft.py)
        out["fuse.weight"] = take(FEATURE_FUSE)
    leftover = [n for n in hf if "rotary_emb" not in n]
    if leftover:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(leftover), leftover[0])
    return out


@contextlib.contextmanager
def _no_embedding_init():
    """Build embeddings without a random init (their weights are replaced at once): on the meta
    device torch's normal_ imports torch._dynamo, 1.5 s of CPU for nothing."""
    reset = torch.nn.Embedding.reset_parameters
    torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Embedding.reset_parameters = reset


def load_hf_dir(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                embeddings_from: CausalLM | None = None, embeddings: torch.Tensor | None = None) -> CausalLM:
    """embeddings_from / embeddings: where a draft without embeddings takes them (a target model, or
    its embedding matrix alone, already in `dtype` on `device`)."""
    if embeddings is None and embeddings_from is not None:
        embeddings = embeddings_from.embed.weight
    elif embeddings is not None and not isinstance(embeddings, torch.nn.Parameter):
        embeddings = torch.nn.Parameter(embeddings, requires_grad=False)
    hf_config = read_hf_config(path)
    try:
        config = ModelConfig.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(f"{path}: config.json lacks {e}") from None
    weights = to_internal_state_dict(read_safetensors(path, dtype if device == "cpu" else None), config)
    with torch.device("meta"), _no_embedding_init():
        model = (FeatureDraft if hf_config.get(FEATURE_DRAFT_KEY) else CausalLM)(config)
    model.load_state_dict(weights, strict=False, assign=True)
    if "embed.weight" not in weights:
        if embeddings is None or not hf_config.get("saguaro_embeddings_from_target"):
            raise CheckpointError(f"{path}: checkpoint lacks {EMBEDDINGS}")
        if embeddings.shape != model.embed.weight.shape:
            raise CheckpointError(f"{path}: its embeddings must come from a target of width "
                                  f"{config.hidden_size} and vocabulary {config.vocab_size}")
        model.embed.weight = embeddings
    if config.tie_embeddings and not config.output_token_ids:
        model.lm_head.weight = model.embed.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks weights for {missing[:3]}")
    model.rotary.inv_freq = rope_inv_freq(config)  # buffers built on the meta device hold no values
    if model.output_token_ids is not None:
        model.output_token_ids = torch.tensor(config.output_token_ids, dtype=torch.long)
    model = model.to(device=device, dtype=dtype).eval()
    if embeddings is not None and "embed.weight" not in weights:
        model.embed.weight = embeddings  # share storage, whatever `to` did
    return model


# ----------------------------------------------------------------------------- GGUF files

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores Llama q/k rows interleaved for its RoPE kernel; restore HF's half-split order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into an HF directory: config.json, model.safetensors, tokenizer files."""
    from gguf import GGUFReader, quants

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({e})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "qwen3"):
        raise CheckpointError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (llama, qwen3)")
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv", heads)
    hidden = field(f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    tensors: dict[str, torch.Tensor] = {}
    rope_factors = None
    for t in reader.tensors:
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32", copy=True))
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif t.name == "rope_freqs.weight":
            rope_factors = w.tolist()
            continue
        elif parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
            if arch == "llama" and parts[2] in ("attn_q", "attn_k"):
                w = unpermute_rope(w, heads if parts[2] == "attn_q" else kv_heads)
        else:
            log.warning("GGUF tensor %s ignored", t.name)
            continue
        tensors[name] = w.contiguous()

    tokenizer = load_gguf_tokenizer(gguf_path)
    vocab = field(f"{arch}.vocab_size") or tensors["model.embed_tokens.weight"].shape[0]
    config = ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=field(f"{arch}.feed_forward_length"),
        num_layers=field(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=field(f"{arch}.attention.key_length") or hidden // heads,
        max_position=field(f"{arch}.context_length", 8192),
        rms_eps=field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=field(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling={"rope_type": "factors", "factors": rope_factors} if rope_factors else None,
        tie_embeddings="output.weight" not in names,
        qk_norm=arch == "qwen3",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    tmp.rename(out_dir / "model.safetensors")  # last: its presence marks a finished conversion


def load_gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


KEEP_CONVERSIONS = 4  # each holds a dense copy of its model (about 600 MB for the embedded target)


@functools.lru_cache(maxsize=64)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of the file's bytes (0.2 s for 100 MB, once per process and file version): a copy of the
    same GGUF elsewhere (a clean clone, a test's temporary directory) reuses its conversion."""
    digest = hashlib.sha256(f"{CONVERSION_VERSION}|".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Convert (once per file content) and return the cached HF directory for a GGUF file; only the
    `KEEP_CONVERSIONS` most recently used conversions are kept."""
    st = gguf_path.stat()
    key = _content_key(str(gguf_path.resolve()), st.st_size, st.st_mtime_ns)
    root = cache_root() / "converted"
    out = root / f"{gguf_path.stem}-{key[:12]}"
    if not (out / "model.safetensors").is_file():
        log.info("converting %s to %s (first load only)", gguf_path.name, out)
        gguf_to_hf(gguf_path, out)
    os.utime(out)  # last used now
    prune_conversions(root)
    return out


def prune_conversions(root: Path, keep: int = KEEP_CONVERSIONS) -> list[Path]:
    """Delete all but the `keep` most recently used converted directories."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in dirs[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed a GGUF conversion not used recently: %s", old.name)
    return dirs[keep:]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The HF directory to load for `path` (an HF directory or a .gguf file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CheckpointError(f"{p}: expected a .gguf file or an HF checkpoint directory")
        return converted_gguf_dir(p)
    return p


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
               embeddings_from: CausalLM | None = None, embeddings: torch.Tensor | None = None) -> CausalLM:
    """Load a checkpoint; a draft that borrows its target's embeddings takes them from `embeddings_from`
    (the target) or `embeddings` (its matrix alone, see load_embeddings)."""
    return load_hf_dir(resolve_checkpoint(path), dtype=dtype, device=device, embeddings_from=embeddings_from,
                       embeddings=embeddings)
