"""Sampling parameters and the distribution every mode samples from (and verifies against)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import torch

import saguaro.logits_processors as lp

MAX_LOGPROBS = 20  # top log-probs per token, at most (as OpenAI's chat and vLLM's default)


class ParamError(ValueError):
    """A sampling setting out of its range; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """Per-request decoding settings, as in vLLM. temperature 0 means greedy.

    presence_penalty and frequency_penalty (OpenAI's, -2..2) count the output tokens;
    repetition_penalty (> 0, 1 = off) every token of the prompt and the output; min_p (0..1) drops
    tokens below min_p times the top token's probability; logit_bias adds -100..100 to token ids'
    logits. logprobs: how many top log-probs to report per output token (0: the chosen token's only;
    None: none). n: completions per prompt, choice i seeded from (seed, i) (`choice_seed`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    max_tokens: int = 16
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    def __post_init__(self):
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def check(name: str, ok: bool, want: str) -> None:
            if not ok:
                raise ParamError(name, f"{name} must be {want}, got {getattr(self, name)!r}")

        check("temperature", number(self.temperature) and self.temperature >= 0, ">= 0")
        check("top_p", number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]")
        check("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "-1, 0 (off) or a positive integer")
        check("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, ">= 1")
        check("n", isinstance(self.n, int) and self.n >= 1, ">= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            check(name, number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, "in [-2, 2]")
        check("repetition_penalty", number(self.repetition_penalty) and self.repetition_penalty > 0, "> 0")
        check("min_p", number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]")
        check("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                                   and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"None or an integer in [0, {MAX_LOGPROBS}]")
        check("logit_bias", isinstance(self.logit_bias, dict), "a dict {token id: bias}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ParamError("logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not number(bias) or not -100 <= bias <= 100:
                raise ParamError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias!r} for {token}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether a processor reads the tokens so far (the engine must then give their history)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check_vocab(self, vocab: int) -> None:
        bad = [t for t in self.logit_bias if t >= vocab]
        if bad:
            raise ParamError("logit_bias", f"logit_bias holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed`: choice 0 keeps it (so n=1 is
    unchanged), choice i > 0 gets one hashed from (seed, i), reproducible and unrelated to seed + i."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # in [0, 2**63)


def choices(params: SamplingParams) -> list[SamplingParams]:
    """The n independent sequences of a request, each with n=1 and its own seed."""
    return [replace(params, n=1, seed=choice_seed(params.seed, i)) for i in range(params.n)]


@dataclass
class History:
    """The tokens before each position, for processors that read them: per row the prompt, the
    committed output, and (speculation) the round's draft tokens [B, P-1], position j seeing drafts[:, :j]."""

    prompts: list[list[int]]
    outputs: list[list[int]]
    drafts: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the request's processed distribution, and the top ones there."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob), most likely first; `logprobs` of them


def target_probs(logits: torch.Tensor, params: list[SamplingParams], history: History | None = None) -> torch.Tensor:
    """The distribution to sample from (and verify against) for logits [N, ..., V], row i under params[i]."""
    return target_distribution(logits, params, history)[0]


def draft_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """What a draft samples from: the request's temperature, top-k and top-p only. Penalties, min_p and
    logit bias are the target's (any q keeps the output exact; this one needs no history)."""
    if any(p.logit_bias or p.min_p or p.needs_history for p in params):
        params = [SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k) for p in params]
    return target_distribution(logits, params)[0]


def target_distribution(logits: torch.Tensor, params: list[SamplingParams], history: History | None = None,
                        logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probs, logprobs or None) for logits [N, ..., V], row i under params[i].

    In vLLM's order: logit bias, repetition / frequency / presence penalties, temperature, min_p,
    top-k, top-p. Greedy rows' probs are one-hot on the argmax of the processed logits, so one
    verification rule serves greedy and sampled rows; their logprobs are the processed distribution
    at temperature 1 (the greedy token is its argmax). Logits with more than one position ([N, P, V])
    need `history.drafts` [N, P-1] when a row has penalties.
    """
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    shape = logits.shape
    flat = logits.reshape(shape[0], -1, shape[-1])
    vocab, device = shape[-1], logits.device
    flat = _process(flat, params, history)

    def per_row(values, dtype=flat.dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    greedy = per_row([p.greedy for p in params], torch.bool)
    z = flat / per_row([p.temperature if not p.greedy else 1.0 for p in params])[:, None, None]
    drop = None
    if any(p.min_p > 0 for p in params):
        drop = lp.min_p_drop(torch.softmax(z, -1), per_row([p.min_p for p in params]))
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k):
        cut = lp.top_k_drop(z, per_row(top_k, torch.long))
        drop = cut if drop is None else drop | cut
    if drop is not None:
        z = z.masked_fill(drop, float("-inf"))
    if any(p.top_p < 1 for p in params):
        z = z.masked_fill(lp.top_p_drop(torch.softmax(z, -1), per_row([p.top_p for p in params])), float("-inf"))
    probs = torch.softmax(z, -1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(flat).scatter_(-1, flat.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None, None], one_hot, probs)
    logp = torch.log_softmax(z, -1).reshape(shape) if logprobs else None
    return probs.reshape(shape), logp


def _process(flat: torch.Tensor, params: list[SamplingParams], history: History | None) -> torch.Tensor:
    """Logit bias and penalties on flat [N, P, V]."""
    b, positions, vocab = flat.shape
    if any(p.logit_bias for p in params):
        bias = torch.zeros(b, vocab, dtype=flat.dtype)
        for i, p in enumerate(params):
            if p.logit_bias:
                bias[i, list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), dtype=flat.dtype)
        flat = lp.apply_logit_bias(flat, bias.to(flat.device))
    if not any(p.needs_history for p in params):
        return flat
    if history is None or (positions > 1 and history.drafts is None):
        raise ValueError("penalties read the tokens so far: pass their History")
    out = lp.counts_with_drafts(lp.token_counts(history.outputs, vocab, flat.device), history.drafts, positions)
    seen = out > 0
    if any(p.repetition_penalty != 1 for p in params):  # the only one that reads the prompt
        seen = seen | (lp.token_counts(history.prompts, vocab, flat.device)[:, None] > 0)

    def per_row(name):
        return torch.tensor([getattr(p, name) for p in params], dtype=flat.dtype, device=flat.device)

    return lp.apply_penalties(flat, out, seen, per_row("repetition_penalty"), per_row("frequency_penalty"),
                              per_row("presence_penalty"))


def token_logprobs(logprobs: torch.Tensor, tokens: list[list[int]], top: list[int | None]
                   ) -> list[list[TokenLogprob] | None]:
    """logprobs [B, P, V] -> per row, the TokenLogprob of tokens[i] (at positions 0..), None where top[i] is None."""
    out: list[list[TokenLogprob] | None] = []
    for i, (row, n) in enumerate(zip(tokens, top)):
        if n is None:
            out.append(None)
            continue
        lps = logprobs[i, : len(row)].float()
        chosen = lps.gather(-1, torch.tensor(row, device=lps.device)[:, None])[:, 0].tolist()
        values, ids = lps.topk(min(n, lps.shape[-1]), -1)
        out.append([TokenLogprob(t, c, list(zip(i_, v_))) for t, c, i_, v_ in
                    zip(row, chosen, ids.tolist(), values.tolist())])
    return out


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [N, V], each row drawing from its own generator.

    Inverse-CDF sampling: one uniform draw u per row, the token is the first whose float64 cumulative
    mass exceeds u times the row's total. Exact up to float64 rounding of the cumulative sums; a token
    of zero probability is never drawn (its interval is empty). Every row keeps its own seeded stream
    and spends one draw per token: the exponential race used before drew V numbers per token, 0.3-1 ms
    of a sampled round's draft and verification steps on a CPU. One-hot rows (greedy) draw no noise.
    """
    out = probs.argmax(-1)
    random_rows = (probs.amax(-1) < 1.0).nonzero()[:, 0].tolist()
    if not random_rows:
        return out
    unseeded = [i for i in random_rows if generators[i] is None]
    u = torch.empty(len(random_rows), dtype=torch.float64)
    if unseeded:
        u[[random_rows.index(i) for i in unseeded]] = torch.rand(len(unseeded), dtype=torch.float64)
    for j, i in enumerate(random_rows):
        if generators[i] is not None:  # seeded streams are CPU generators: the same draws on every device
            u[j] = torch.rand(1, generator=generators[i], dtype=torch.float64)[0]
    rows = torch.tensor(random_rows, device=probs.device)
    cdf = probs[rows].double().cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total, so the first index whose cumulative mass exceeds it has mass of its own
    x = torch.minimum(u.to(probs.device)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    out[rows] = torch.searchsorted(cdf, x, right=True)[:, 0]
    return out


def uniform(n: int, generators: list[torch.Generator | None], device="cpu") -> torch.Tensor:
    """[len(generators), n] draws from U[0, 1), row i from generators[i]."""
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators]).to(device)
