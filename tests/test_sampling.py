"""The target distribution: temperature, top-k, top-p, greedy; seeded sampling."""

import pytest
import torch

from saguaro.sampling import SamplingParams, sample, target_probs


def test_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    probs = target_probs(logits, [SamplingParams(temperature=0)])
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_top_k_top_p_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 50, dtype=torch.float64)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.6)]
    probs = target_probs(logits, params)
    torch.testing.assert_close(probs[0], torch.softmax(logits[0] / 0.7, -1))
    ref = torch.softmax(logits[1] / 1.3, -1)
    keep = ref >= ref.topk(5, -1).values[:, -1:]
    torch.testing.assert_close(probs[1], ref * keep / (ref * keep).sum(-1, keepdim=True))
    base = torch.softmax(logits[2], -1)
    for row, got in zip(base, probs[2]):
        order = row.argsort(descending=True)
        cum = 0.0
        want = torch.zeros_like(row)
        for t in order:  # smallest prefix of the sorted tokens whose mass reaches top_p
            want[t] = row[t]
            cum += float(row[t])
            if cum >= 0.6:
                break
        torch.testing.assert_close(got, want / want.sum())


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(2, 10)
    probs = target_probs(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0)])
    assert probs[0].max() == 1.0 and probs[0].argmax() == logits[0].argmax()
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], -1))


def test_seeded_sample_reproducible_and_distributed_as_p():
    p = torch.tensor([[0.5, 0.3, 0.2]]).expand(20000, 3).contiguous()
    gens = [torch.Generator().manual_seed(i) for i in range(20000)]
    a = sample(p, gens)
    b = sample(p, [torch.Generator().manual_seed(i) for i in range(20000)])
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.015)


def test_sample_never_draws_a_zero_probability_token_and_follows_p_unnormalised():
    """Inverse-CDF sampling: zero-mass tokens (leading, inner, trailing) are never drawn, an unnormalised row
    (a residual before normalising) is drawn in proportion, seeded or not; a chi-square test on 40k draws."""
    from scipy.stats import chisquare

    row = torch.tensor([0.0, 0.2, 0.0, 0.0, 0.5, 0.1, 0.0, 0.4, 0.0]) * 0.37
    n = 40_000
    p = row.expand(n, -1).contiguous()
    for gens in ([None] * n, [torch.Generator().manual_seed(i) for i in range(n)]):
        drawn = sample(p, gens)
        counts = torch.bincount(drawn, minlength=len(row))
        assert counts[row == 0].sum() == 0
        support = row > 0
        expected = (row[support] / row.sum() * n).double()
        assert chisquare(counts[support].double().numpy(), expected.numpy()).pvalue > 0.01


def test_sample_negative_control_a_shifted_cdf_fails():
    """The chi-square test above has the power to see an off-by-one in the search (every draw one token later)."""
    from scipy.stats import chisquare

    row = torch.tensor([0.2, 0.5, 0.1, 0.2])
    drawn = (sample(row.expand(40_000, -1).contiguous(), [None] * 40_000) + 1) % 4
    counts = torch.bincount(drawn, minlength=4).double()
    assert chisquare(counts.numpy(), (row * 40_000).double().numpy()).pvalue < 0.01


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.01), dict(max_tokens=0),
                                dict(top_k=-2)])
def test_invalid_params_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
