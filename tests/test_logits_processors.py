"""The logits processors (penalties, logit bias, min_p) against references, and the processed target
distribution: per position under speculation, greedy on the processed argmax, log-probs."""

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

import saguaro.logits_processors as lp
from saguaro.sampling import (History, ParamError, SamplingParams, choice_seed, choices, draft_probs,
                              target_distribution, target_probs, token_logprobs)

V = 20


def test_token_counts_and_drafts_per_position():
    rows = [[3, 3, 5], [], [19]]
    counts = lp.token_counts(rows, V)
    assert counts[0, 3] == 2 and counts[0, 5] == 1 and counts[1].sum() == 0 and counts[2, 19] == 1
    drafts = torch.tensor([[5, 7], [1, 1], [0, 19]])
    per_pos = lp.counts_with_drafts(counts, drafts, 3)
    for i, row in enumerate(rows):
        for j in range(3):  # position j saw the row's tokens and drafts[:j]
            assert torch.equal(per_pos[i, j], lp.token_counts([row + drafts[i, :j].tolist()], V)[0])


def test_penalties_match_references():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, V, dtype=torch.float64) * 3
    prompts, outputs = [[1, 2, 2], [4]], [[2, 6, 6, 6], []]
    out = lp.token_counts(outputs, V, dtype=torch.float64)[:, None]
    seen = (lp.token_counts(prompts, V)[:, None] > 0) | (out > 0)
    got = lp.apply_penalties(logits, out, seen, torch.tensor([1.7, 0.6]), torch.tensor([0.5, -1.0]),
                             torch.tensor([1.5, 2.0]))
    for i in range(2):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor([1.7, 0.6][i])(ids, logits[i].clone())[0]
        for t in set(outputs[i]):  # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence
            want[t] -= outputs[i].count(t) * [0.5, -1.0][i] + [1.5, 2.0][i]
        torch.testing.assert_close(got[i, 0], want)


def test_min_p_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(3, 2, V) * 2
    probs = torch.softmax(logits, -1)
    drop = lp.min_p_drop(probs, torch.tensor([0.1, 0.0, 0.5]))
    for i, m in enumerate([0.1, 0.0, 0.5]):
        if m == 0:
            assert not drop[i].any()
            continue
        want = MinPLogitsWarper(m)(None, logits[i].clone()) == float("-inf")
        assert torch.equal(drop[i], want)


def test_logit_bias_and_greedy_take_the_processed_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    probs, logp = target_distribution(logits, [SamplingParams(temperature=0, logit_bias={2: 5.0})], logprobs=True)
    assert probs.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    torch.testing.assert_close(logp, torch.log_softmax(logits + torch.tensor([0, 0, 5.0, 0]), -1))
    rep = SamplingParams(temperature=0, frequency_penalty=1.0)
    probs = target_probs(logits, [rep], History([[0]], [[1, 1]]))
    assert probs.argmax().item() == 3  # token 1 lost 2.0


def test_speculative_positions_equal_one_position_each():
    """Position j of a [B, K+1, V] round scores exactly as one position with drafts[:j] appended."""
    torch.manual_seed(2)
    logits = torch.randn(2, 4, V, dtype=torch.float64)
    params = [SamplingParams(temperature=0.8, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3,
                             min_p=0.05, logit_bias={3: 2.0}, top_k=9, top_p=0.9),
              SamplingParams(temperature=0, repetition_penalty=0.8, frequency_penalty=-0.5)]
    prompts, outputs = [[1, 2], [3, 3, 4]], [[5, 5], [7]]
    drafts = torch.tensor([[5, 8, 8], [7, 1, 3]])
    probs, logp = target_distribution(logits, params, History(prompts, outputs, drafts), logprobs=True)
    for j in range(4):
        hist = History(prompts, [o + drafts[i, :j].tolist() for i, o in enumerate(outputs)])
        p1, l1 = target_distribution(logits[:, j], params, hist, logprobs=True)
        torch.testing.assert_close(probs[:, j], p1, rtol=0, atol=0)
        torch.testing.assert_close(logp[:, j], l1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="History"):
        target_probs(logits, params)


def test_logprobs_are_the_processed_distribution():
    torch.manual_seed(3)
    logits = torch.randn(1, 1, V, dtype=torch.float64)
    params = SamplingParams(temperature=0.5, top_k=4, min_p=0.0)
    probs, logp = target_distribution(logits, [params], logprobs=True)
    kept = probs[0, 0] > 0
    assert int(kept.sum()) == 4
    torch.testing.assert_close(logp[0, 0][kept], probs[0, 0][kept].log())
    assert torch.isinf(logp[0, 0][~kept]).all()
    (row,) = token_logprobs(logp, [[int(logits.argmax())]], [3])
    assert row[0].logprob == row[0].top[0][1] and len(row[0].top) == 3


def test_draft_probs_ignore_the_targets_processors():
    logits = torch.randn(2, V)
    plain = SamplingParams(temperature=0.9, top_k=5)
    full = SamplingParams(temperature=0.9, top_k=5, logit_bias={1: 50.0}, min_p=0.3, presence_penalty=1.0)
    torch.testing.assert_close(draft_probs(logits, [full, full]), target_probs(logits, [plain, plain]))


def test_choice_seeds():
    assert choice_seed(7, 0) == 7 and choice_seed(None, 3) is None
    seeds = [p.seed for p in choices(SamplingParams(seed=7, n=4))]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [choice_seed(7, i) for i in range(4)] and choice_seed(7, 1) != choice_seed(8, 1)


@pytest.mark.parametrize("kw, param", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(logit_bias={3: 101}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(n=0), "n"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_out_of_range_settings_name_their_field(kw, param):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kw)
    assert e.value.param == param
    with pytest.raises(ParamError, match="vocabulary"):
        SamplingParams(logit_bias={V: 1.0}).check_vocab(V)
