"""SD and SSD stay exact with penalties, min_p and logit bias active, and report the target's log-probs.

The verifier scores position j of a round with the round's draft tokens before it counted; a
verifier that forgets them (the negative control) is measurably biased.
"""

import itertools
from dataclasses import replace

import pytest
import torch

import saguaro.logits_processors as lp
from saguaro.engine.base import AREngine
from saguaro.engine.sequence import Sequence
from saguaro.engine.speculative import SDEngine
from saguaro.engine.speculators import NeuralSpeculator, NgramSpeculator
from saguaro.engine.ssd import LocalDrafter, SSDEngine
from saguaro.sampling import History, SamplingParams, target_distribution, target_probs
from saguaro.ssd.drafter import SSDDrafter
from saguaro.ssd.fanout import geometric_fanout
from tests.test_sd_exactness import N_SAMPLES, SMALL_VOCAB, STOP, VOCAB, chi2_pvalue, prompts
from tests.tiny import perturbed, tiny_model

PENALISED = SamplingParams(temperature=1.3, presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.5,
                           min_p=0.03, logit_bias={0: 1.0, 7: -0.7}, max_tokens=3)
PROMPT = [1, 4, 2, 1, 4]


def exact_joint(target, prompt, params, n=3):
    """P(first n generated tokens) under the target with the request's processors, by enumeration."""
    probs = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in probs.items():
            logits = target(torch.tensor([prompt + list(prefix)]), target.new_cache(1))[:, -1]
            dist = target_probs(logits, [params], History([prompt], [list(prefix)]))[0]
            for t in range(SMALL_VOCAB):
                nxt[prefix + (t,)] = pr * float(dist[t])
        probs = nxt
    return probs


def pvalue(samples, probs) -> float:
    """The chi-square p-value, 0 when a sample has probability 0 under the target (min_p cut it)."""
    if any(probs[s] == 0 for s in samples):
        return 0.0
    return chi2_pvalue(samples, {cell: pr for cell, pr in probs.items() if pr > 0})


def samples(engine, params):
    seqs = [Sequence(list(PROMPT), replace(params, seed=i)) for i in range(N_SAMPLES)]
    engine.run(seqs)
    return [tuple(s.output_ids) for s in seqs], seqs


def stat_models():
    target = tiny_model(11, SMALL_VOCAB, scale=0.6)
    return target, perturbed(target, 5, 0.6)  # a loose draft: about one proposal in seven accepted


def sd_engine(target, draft, k=2):
    return SDEngine(target, NeuralSpeculator(draft, SMALL_VOCAB), k, set(), max_batch_size=N_SAMPLES)


def ssd_engine(target, draft, k=2, fanout=(2, 1, 2), vocab=SMALL_VOCAB, stop=frozenset(), max_batch=N_SAMPLES):
    drafter = SSDDrafter(draft, vocab, k, list(fanout), c=0.5)
    return SSDEngine(target, LocalDrafter(drafter), k, set(stop), max_batch_size=max_batch)


ENGINES = {"sd": sd_engine, "ssd": ssd_engine}


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_sampled_speculation_with_processors_follows_the_processed_target(mode):
    target, draft = stat_models()
    got, seqs = samples(ENGINES[mode](target, draft), PENALISED)
    assert sum(s.stats.accepted for s in seqs) > N_SAMPLES / 10  # rounds with accepted drafts were checked
    assert pvalue(got, exact_joint(target, PROMPT, PENALISED)) > 0.01


def forget_drafts(counts, drafts, positions):
    """Negative control: every position of a round counts only the committed tokens."""
    return counts[:, None].expand(-1, positions, -1)


@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_negative_control_verifier_forgetting_the_rounds_drafts_fails(mode, monkeypatch):
    monkeypatch.setattr(lp, "counts_with_drafts", forget_drafts)
    target, draft = stat_models()
    got, _ = samples(ENGINES[mode](target, draft), PENALISED)
    probs = exact_joint(target, PROMPT, PENALISED)
    assert pvalue(got, probs) < 0.01
    possible = {cell: pr for cell, pr in probs.items() if pr > 0}  # not only outcomes min_p forbids: all skewed
    assert chi2_pvalue([g for g in got if g in possible], possible) < 0.01


GREEDY = SamplingParams(temperature=0, presence_penalty=1.2, frequency_penalty=0.9, repetition_penalty=1.3,
                        logit_bias={3: 1.5}, max_tokens=20, logprobs=3)
# negative penalties favour repeats, which n-gram lookup proposes
REPEATING = replace(GREEDY, presence_penalty=-0.6, frequency_penalty=-0.4, repetition_penalty=0.8)


def run(engine, ps, params):
    seqs = [Sequence(p, params) for p in ps]
    engine.run(seqs)
    return seqs


@pytest.mark.parametrize("mode", ["sd", "sd-ngram", "ssd"])
def test_greedy_with_processors_equals_ar(mode):
    """Bitwise (float64): the same tokens as AR, and penalties change them."""
    params = REPEATING if mode == "sd-ngram" else GREEDY
    plain = replace(params, presence_penalty=0, frequency_penalty=0, repetition_penalty=1, logit_bias={})
    changed = accepted = 0
    for seed, k in itertools.product(range(2), (1, 3)):
        target = tiny_model(seed, VOCAB)
        ps = prompts(seed * 10 + k, 3)
        want = run(AREngine(target, STOP), ps, params)
        if mode == "ssd":
            fanout = geometric_fanout(3 * (k + 1), k, 0.7, 0.6)
            engine = ssd_engine(target, perturbed(target, seed, 0.05), k, fanout, VOCAB, STOP, 64)
        else:
            spec = NgramSpeculator() if mode == "sd-ngram" else NeuralSpeculator(perturbed(target, seed, 0.05), VOCAB)
            engine = SDEngine(target, spec, k, STOP)
        got = run(engine, ps, params)
        assert [s.output_ids for s in got] == [s.output_ids for s in want], (seed, k)
        assert [s.logprobs for s in got] == [s.logprobs for s in want]
        changed += [s.output_ids for s in run(AREngine(target, STOP), ps, plain)] != [s.output_ids for s in want]
        accepted += sum(s.stats.accepted for s in got)
    assert changed and accepted


def reference_logprobs(target, seq):
    """AR's log-probs of seq's tokens, one forward per position (teacher forcing)."""
    out = []
    for j, token in enumerate(seq.output_ids):
        ids = torch.tensor([seq.prompt_ids + seq.output_ids[:j]])
        logits = target(ids, target.new_cache(1))[:, -1]
        _, logp = target_distribution(logits, [seq.params], History([seq.prompt_ids], [seq.output_ids[:j]]), True)
        out.append(float(logp[0, token]))
    return out


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_targets_in_float32(mode, temperature):
    target = tiny_model(3, VOCAB).float()
    draft = perturbed(target, 3, 0.05).float()
    params = replace(GREEDY, temperature=temperature, min_p=0.02 if temperature else 0.0, max_tokens=16, logprobs=4)
    ps = prompts(4, 3)
    if mode == "ar":
        engine = AREngine(target, STOP)
    elif mode == "sd":
        engine = SDEngine(target, NeuralSpeculator(draft, VOCAB), 3, STOP)
    else:
        engine = ssd_engine(target, draft, 3, geometric_fanout(8, 3, 0.7, 0.6), VOCAB, STOP, 64)
    seqs = [Sequence(p, replace(params, seed=i)) for i, p in enumerate(ps)]
    engine.run(seqs)
    if mode != "ar":
        assert sum(s.stats.accepted for s in seqs) > 0
    for s in seqs:
        assert [lp_.token_id for lp_ in s.logprobs] == s.output_ids
        want = reference_logprobs(target, s)
        got = [lp_.logprob for lp_ in s.logprobs]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
        for lp_ in s.logprobs:
            assert len(lp_.top) == 4 and lp_.top[0][1] >= lp_.logprob
            if temperature == 0:  # the greedy token is the top one
                assert lp_.logprob == max(v for _, v in lp_.top) and lp_.top[0][0] == lp_.token_id
