"""Greedy SD is token-identical to AR; sampled SD follows the target's distribution exactly."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from saguaro.engine import scoring
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine
from saguaro.engine.speculators import NeuralSpeculator, NgramSpeculator
from saguaro.sampling import SamplingParams, sample
from tests.tiny import perturbed, tiny_model

VOCAB = 32
STOP = {VOCAB - 1}


def prompts(seed: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        n = 3 + int(torch.randint(0, 9, (1,), generator=g))
        body = torch.randint(0, VOCAB - 1, (n,), generator=g).tolist()
        out.append(body + body[: n // 2])  # some repetition for the n-gram speculator
    return out


def run(engine, prompt_ids, params):
    seqs = [Sequence(p, params) for p in prompt_ids]
    engine.run(seqs)
    return [s.output_ids for s in seqs], seqs


def speculator(kind: str, target, seed: int):
    if kind == "ngram":
        return NgramSpeculator()
    draft = perturbed(target, seed, 0.05) if kind == "close" else tiny_model(seed + 100, VOCAB)
    return NeuralSpeculator(draft, VOCAB)


@pytest.mark.parametrize("kind", ["close", "random", "ngram"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_equals_ar(kind, batch):
    params = SamplingParams(temperature=0, max_tokens=24)
    accepted_total = 0
    for seed, k in itertools.product(range(3), range(1, 9)):
        target = tiny_model(seed, VOCAB)
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        got, seqs = run(SDEngine(target, speculator(kind, target, seed), k, STOP), ps, params)
        assert got == want, (kind, seed, k)
        accepted_total += sum(s.stats.accepted for s in seqs)
    assert accepted_total > 0  # the speculative path was really exercised


def test_sd_handles_eos_inside_accepted_run_and_max_tokens():
    target = tiny_model(5, VOCAB)
    ps = prompts(5, 4)
    free, _ = run(AREngine(target, set()), ps, SamplingParams(temperature=0, max_tokens=30))
    stop = {free[0][7]}  # a token the first sequence emits mid-way becomes EOS
    for max_tokens in (1, 2, 5, 13):
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        want, _ = run(AREngine(target, stop), ps, params)
        got, seqs = run(SDEngine(target, NeuralSpeculator(perturbed(target, 1, 0.02), VOCAB), 6, stop), ps, params)
        assert got == want
        assert all(len(g) <= max_tokens for g in got)


def test_draft_with_reduced_output_vocabulary():
    """A draft that can only emit some tokens (q = 0 elsewhere) is still exact."""
    target = tiny_model(7, VOCAB)
    keep = list(range(0, VOCAB, 2)) + [1, 3, 5]
    draft = tiny_model(8, VOCAB, output_token_ids=keep)
    params = SamplingParams(temperature=0, max_tokens=20)
    ps = prompts(3, 4)
    want, _ = run(AREngine(target, STOP), ps, params)
    got, _ = run(SDEngine(target, NeuralSpeculator(draft, VOCAB), 3, STOP), ps, params)
    assert got == want


# --------------------------------------------------------------------------- statistical exactness

SMALL_VOCAB = 12
N_SAMPLES = 12_000


def exact_joint(target, prompt, temperature, n=3):
    """P(first n generated tokens) under the target, by enumeration."""
    params = SamplingParams(temperature=temperature)
    from saguaro.sampling import target_probs

    probs = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in probs.items():
            ids = torch.tensor([prompt + list(prefix)])
            dist = target_probs(target(ids, target.new_cache(1))[:, -1], [params])[0]
            for t in range(SMALL_VOCAB):
                nxt[prefix + (t,)] = pr * float(dist[t])
        probs = nxt
    return probs


def sd_samples(target, spec, prompt, temperature, k):
    seqs = [Sequence(list(prompt), SamplingParams(temperature=temperature, max_tokens=3, seed=i))
            for i in range(N_SAMPLES)]
    SDEngine(target, spec, k, set(), max_batch_size=N_SAMPLES).run(seqs)
    return [tuple(s.output_ids) for s in seqs]


def chi2_pvalue(samples, probs):
    cells = sorted(probs, key=probs.get, reverse=True)
    expected, observed = [], []
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    rest_e = rest_o = 0.0
    for c in cells:  # pool cells too rare for the chi-square approximation
        e = probs[c] * len(samples)
        if e >= 5:
            expected.append(e)
            observed.append(counts.get(c, 0))
        else:
            rest_e += e
            rest_o += counts.get(c, 0)
    if rest_e > 0:  # (none left over when every cell is common enough)
        expected.append(rest_e)
        observed.append(rest_o)
    return chisquare(observed, expected).pvalue


def statistical_setup(kind):
    target = tiny_model(11, SMALL_VOCAB, scale=0.6)
    prompt = [1, 4, 2, 1, 4]
    if kind == "ngram":
        return target, NgramSpeculator(), prompt
    return target, NeuralSpeculator(tiny_model(12, SMALL_VOCAB, scale=0.6), SMALL_VOCAB), prompt  # disagrees


@pytest.mark.parametrize("kind", ["neural", "ngram"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_sd_follows_target_distribution(kind, temperature):
    target, spec, prompt = statistical_setup(kind)
    samples = sd_samples(target, spec, prompt, temperature, k=2)
    assert chi2_pvalue(samples, exact_joint(target, prompt, temperature)) > 0.01


# A draft head over 8 of the 12 tokens, not in id order: q is drawn over the head and expanded.
REDUCED_HEAD = [5, 0, 3, 11, 2, 7, 1, 9]


def test_sampled_sd_with_reduced_draft_head_follows_target_distribution():
    target, _, prompt = statistical_setup("neural")
    draft = tiny_model(12, SMALL_VOCAB, scale=0.6, output_token_ids=REDUCED_HEAD)
    samples = sd_samples(target, NeuralSpeculator(draft, SMALL_VOCAB), prompt, 1.0, k=2)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) > 0.01


def wrong_verify(draft_tokens, q, p, generators, lengths=None):
    """Negative control: on rejection resample from p instead of the residual max(0, p - q)."""
    from saguaro.sampling import uniform

    b, k = draft_tokens.shape
    p_d = p[:, :k].gather(-1, draft_tokens[..., None])[..., 0]
    q_d = q.gather(-1, draft_tokens[..., None])[..., 0]
    accepted = (uniform(k, generators).to(p.dtype) * q_d < p_d).int().cumprod(-1).sum(-1)
    return accepted, sample(p[torch.arange(b), accepted], generators)


def test_negative_control_wrong_verifier_fails(monkeypatch):
    monkeypatch.setattr(scoring, "verify", wrong_verify)  # the verifier every speculative round calls
    target, spec, prompt = statistical_setup("neural")
    samples = sd_samples(target, spec, prompt, 1.0, k=2)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) < 0.01


def test_greedy_verification_equals_the_rule_with_one_hot_p():
    """verify_greedy (all-greedy rounds, no probabilities formed) gives what `verify` gives when p is
    one-hot on the target's tokens, for deterministic drafts and for drafts with any q."""
    from saguaro.engine.verify import verify, verify_greedy

    g = torch.Generator().manual_seed(0)
    vocab, k = 7, 4
    for trial in range(200):
        targets = torch.randint(0, vocab, (3, k + 1), generator=g)
        drafts = torch.where(torch.rand(3, k, generator=g) < 0.6, targets[:, :k], torch.randint(0, vocab, (3, k), generator=g))
        p = torch.zeros(3, k + 1, vocab).scatter_(-1, targets[..., None], 1.0)
        q = torch.softmax(torch.randn(3, k, vocab, generator=g) * 3, -1) if trial % 2 else None
        lengths = torch.randint(0, k + 1, (3,), generator=g) if trial % 3 == 0 else None  # some propose fewer
        want = verify(drafts, q, p, [torch.Generator().manual_seed(trial + i) for i in range(3)], lengths)
        got = verify_greedy(drafts, targets, lengths)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if lengths is not None:
            assert bool((got[0] <= lengths).all())


# --------------------------------------------------------------------------- drafts of varying length

@pytest.mark.parametrize("kind", ["close", "random"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_stopping_where_unsure_equals_ar(kind, batch):
    """A draft that stops where its top probability is low proposes rows of different lengths in one
    round; greedy output is still AR's, token for token."""
    params = SamplingParams(temperature=0, max_tokens=24)
    rounds = drafted = 0
    for seed, k in itertools.product(range(3), (2, 4, 7)):
        target = tiny_model(seed, VOCAB)
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        draft = perturbed(target, seed, 0.05) if kind == "close" else tiny_model(seed + 100, VOCAB)
        got, seqs = run(SDEngine(target, NeuralSpeculator(draft, VOCAB, min_confidence=0.45), k, STOP), ps, params)
        assert got == want, (kind, seed, k)
        rounds += sum(s.stats.rounds * k for s in seqs)
        drafted += sum(s.stats.drafted for s in seqs)
    assert 0 < drafted < rounds  # some rounds stopped early, some drafted on


class PeekingSpeculator(NeuralSpeculator):
    """Negative control: the proposal ends before the first token whose own q is low, a rule that looks
    at the token drawn, not only at what came before it."""

    def propose(self, seqs, k):
        proposal = super().propose(seqs, k)
        own_q = proposal.q.gather(-1, proposal.tokens[..., None])[..., 0]
        proposal.lengths = (own_q >= self.peek).int().cumprod(-1).sum(-1)
        return proposal


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_sd_stopping_where_unsure_follows_target_distribution(temperature):
    target, _, prompt = statistical_setup("neural")
    spec = NeuralSpeculator(tiny_model(12, SMALL_VOCAB, scale=0.6), SMALL_VOCAB, min_confidence=0.6)
    seqs = [Sequence(list(prompt), SamplingParams(temperature=temperature, max_tokens=3, seed=i))
            for i in range(N_SAMPLES)]
    SDEngine(target, spec, 3, set(), max_batch_size=N_SAMPLES).run(seqs)
    assert 0 < sum(s.stats.drafted for s in seqs) < 3 * sum(s.stats.rounds for s in seqs)
    samples = [tuple(s.output_ids) for s in seqs]
    assert chi2_pvalue(samples, exact_joint(target, prompt, temperature)) > 0.01


def test_negative_control_stopping_on_the_drawn_token_fails():
    target, _, prompt = statistical_setup("neural")
    spec = PeekingSpeculator(tiny_model(12, SMALL_VOCAB, scale=0.6), SMALL_VOCAB)
    spec.peek = 0.5
    samples = sd_samples(target, spec, prompt, 1.0, k=3)
    assert chi2_pvalue(samples, exact_joint(target, prompt, 1.0)) < 0.01


# --------------------------------------------------------------------------- prompt lookup ahead of the draft

class FreshDraftCheck(NeuralSpeculator):
    """Checks each drafted round against a draft that reads the whole sequence afresh: the draft's cache
    must stay in step with the sequence across the rounds prompt lookup proposed for (it skips them)."""

    def propose(self, seqs, k):
        proposal = super().propose(seqs, k)
        if not proposal.from_lookup:
            for row, s in enumerate(seqs):
                ids = list(s.all_ids)
                n = proposal.tokens.shape[1] if proposal.lengths is None else int(proposal.lengths[row])
                for j in range(n):
                    logits = self.draft(torch.tensor([ids]), self.draft.new_cache(1, len(ids) + 1))[0, -1]
                    assert int(logits.argmax()) == int(proposal.tokens[row, j])
                    ids.append(int(proposal.tokens[row, j]))
        return proposal


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_sd_with_prompt_lookup_ahead_of_the_draft_equals_ar(batch):
    """Greedy rows whose last tokens occurred before take prompt lookup's continuation and the draft
    skips the round; output is AR's token for token, and the draft's later proposals are what it would
    propose reading the sequence afresh."""
    params = SamplingParams(temperature=0, max_tokens=24)
    lookups = drafted_rounds = 0
    for seed, k, min_match in itertools.product(range(3), (2, 4), (2, 3)):
        target = tiny_model(seed, VOCAB)
        ps = prompts(seed * 10 + k, batch)
        want, _ = run(AREngine(target, STOP), ps, params)
        spec = FreshDraftCheck(perturbed(target, seed, 0.05), VOCAB, min_confidence=0.45, lookup_min_match=min_match)
        got, seqs = run(SDEngine(target, spec, k, STOP), ps, params)
        assert got == want, (seed, k, min_match)
        lookups += sum(s.stats.lookup_rounds for s in seqs)
        drafted_rounds += sum(s.stats.rounds - s.stats.lookup_rounds for s in seqs)
    assert lookups > 0 and drafted_rounds > 0  # both kinds of round ran


class ChunkedReadCheck(FreshDraftCheck):
    """As if the draft had compiled steps of up to `chunk` tokens: longer pending runs are read ahead in
    chunks of that many (`read_ahead`), which must leave the draft's cache as one read would."""

    chunk = 2

    def read_chunk(self) -> int:
        return self.chunk


@pytest.mark.parametrize("chunk", [2, 3])
def test_draft_reading_ahead_in_chunks_after_lookup_rounds_equals_ar(monkeypatch, chunk):
    from saguaro.speculators import neural

    chunked = []
    read_ahead = neural.read_ahead

    def counting(draft, cache, tokens, size):
        rest = read_ahead(draft, cache, tokens, size)
        chunked.append(len(tokens) - len(rest))
        return rest

    monkeypatch.setattr(neural, "read_ahead", counting)
    params = SamplingParams(temperature=0, max_tokens=24)
    for seed, k in itertools.product(range(3), (2, 4)):
        target = tiny_model(seed, VOCAB)
        ps = prompts(seed * 10 + k, 1)
        want, _ = run(AREngine(target, STOP), ps, params)
        spec = ChunkedReadCheck(perturbed(target, seed, 0.05), VOCAB, min_confidence=0.45, lookup_min_match=2)
        spec.chunk = chunk
        got, _ = run(SDEngine(target, spec, k, STOP), ps, params)
        assert got == want, (seed, k)
    assert any(n > 0 for n in chunked)  # some rounds read pending tokens ahead, in chunks


def test_sampled_rows_never_take_prompt_lookup():
    """Lookup proposes deterministically; it is kept to greedy batches, so sampled SD is the path the χ²
    tests above check."""
    target, _, prompt = statistical_setup("neural")
    spec = NeuralSpeculator(tiny_model(12, SMALL_VOCAB, scale=0.6), SMALL_VOCAB, lookup_min_match=1)
    seqs = [Sequence(list(prompt) * 3, SamplingParams(temperature=1.0, max_tokens=6, seed=i)) for i in range(8)]
    SDEngine(target, spec, 3, set(), max_batch_size=8).run(seqs)
    assert sum(s.stats.lookup_rounds for s in seqs) == 0 and sum(s.stats.rounds for s in seqs) > 0
    with pytest.raises(ValueError, match="lookup_min_match"):
        NeuralSpeculator(target, SMALL_VOCAB, lookup_min_match=-1)
