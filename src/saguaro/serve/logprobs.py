"""Log-probs in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` and the
legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

Each is the target's log-probability under the request's processed distribution (sampling.py). A
token the request's processors ruled out (min_p, top-k, top-p) has log-probability -inf, which JSON
cannot hold: it is sent as -9999.0, as vLLM does.
"""

from __future__ import annotations

from saguaro.sampling import TokenLogprob

FLOOR = -9999.0


def _finite(x: float) -> float:
    return max(x, FLOOR)


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[int, tuple[str, list[int]]] = {}  # at most the vocabulary

    def token(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text (U+FFFD for a part of a character) and its bytes."""
        if token_id not in self._tokens:
            raw = self.tokenizer.token_bytes(token_id)
            self._tokens[token_id] = raw.decode("utf-8", errors="replace"), list(raw)
        return self._tokens[token_id]

    def chat(self, items: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text, raw = self.token(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": raw}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in items], "refusal": None}

    def completion(self, items: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The legacy object for these tokens, whose text starts `offset` characters into the completion;
        and the offset after them. top_logprobs holds the top ones and, as OpenAI's, the chosen token."""
        tokens, offsets, tops = [], [], []
        for t in items:
            text = self.token(t.token_id)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            top = {self.token(i)[0]: _finite(v) for i, v in t.top}
            top.setdefault(text, _finite(t.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [_finite(t.logprob) for t in items], "top_logprobs": tops,
                "text_offset": offsets}, offset
