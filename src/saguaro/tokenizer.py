"""The checkpoint's own tokenizer and chat template, through `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

# End-of-turn markers that chat checkpoints use besides their declared EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


class Tokenizer:
    def __init__(self, hf_tokenizer, stop_token_ids: set[int]):
        self.hf = hf_tokenizer
        self.stop_token_ids = stop_token_ids
        self._byte_decoder: dict[str, int] | None = None

    @classmethod
    def load(cls, path: Path, eos_token_ids: list[int] | tuple[int, ...] = ()) -> "Tokenizer":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
        stop = set(eos_token_ids)
        if hf.eos_token_id is not None:
            stop.add(hf.eos_token_id)
        gen_cfg = path / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            stop.update([eos] if isinstance(eos, int) else (eos or []))
        vocab = hf.get_vocab()
        stop.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return cls(hf, stop)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes: for byte-level BPE these may be part of a UTF-8 character, which
        decoding the token alone would turn into U+FFFD."""
        if self._byte_decoder is None:
            decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
            self._byte_decoder = {}
            if type(decoder).__name__ == "ByteLevel":
                from transformers.convert_slow_tokenizer import bytes_to_unicode

                self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        raw = self.hf.convert_ids_to_tokens(token_id)
        if self._byte_decoder and isinstance(raw, str) and all(c in self._byte_decoder for c in raw):
            return bytes(self._byte_decoder[c] for c in raw)
        return self.hf.decode([token_id], skip_special_tokens=False).encode()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` under the checkpoint's chat template, ready for the assistant's reply."""
        if not self.has_chat_template:
            raise ValueError("this checkpoint has no chat template; use raw completion instead")
        out = self.hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out)
