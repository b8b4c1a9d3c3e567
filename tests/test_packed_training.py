"""Packed distillation batches: the rows laid end to end, each causal on its own, and the head only where
a label is, give the padded batch's logits, loss and gradients."""

import pytest
import torch

from saguaro.distill.train import distill_loss, pack_rows, tail_loss, target_to_draft_index
from tests.tiny import tiny_model

VOCAB, TOPK = 32, 4
HEAD = list(range(0, VOCAB, 2))
LENGTHS = [9, 14, 5]  # real tokens of each row; the batch is padded to 14


def padded_batch():
    g = torch.Generator().manual_seed(3)
    width, n = max(LENGTHS), len(LENGTHS)
    tokens = torch.zeros(n, width, dtype=torch.long)
    weight = torch.zeros(n, width)
    for i, length in enumerate(LENGTHS):
        tokens[i, :length] = torch.randint(0, VOCAB, (length,), generator=g)
        weight[i, 2 : length - 1] = 1.0  # labels from the prompt's last token to the one before the end
    ids = torch.randint(0, VOCAB, (n, width, TOPK), generator=g).int()
    probs = torch.softmax(torch.randn(n, width, TOPK, generator=g) * 2, -1) * 0.9
    outside = torch.full((n, width), 0.1)
    return tokens, weight, ids, probs, outside


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_packed_forward_gives_each_rows_logits_as_padded():
    draft = tiny_model(1, VOCAB, output_token_ids=HEAD).float()
    tokens, weight, *_ = padded_batch()
    packed, wanted, labelled = pack_rows(tokens, LENGTHS, weight)
    assert packed.shape == (1, sum(LENGTHS)) and len(wanted) == int(weight.sum())
    with torch.no_grad():
        padded = draft.forward_train(tokens)[labelled]
        torch.testing.assert_close(draft.forward_train(packed, tuple(LENGTHS), wanted), padded)
        # negative control: without the boundary between rows 0 and 1, row 1 sees row 0 (and its positions
        # run on from it), and its logits change
        merged = draft.forward_train(packed, (LENGTHS[0] + LENGTHS[1], LENGTHS[2]), wanted)
        assert not torch.allclose(merged, padded, atol=1e-3)


def test_packed_losses_and_gradients_equal_the_padded_ones():
    draft = tiny_model(2, VOCAB, output_token_ids=HEAD).float()
    index = target_to_draft_index(draft.output_token_ids, VOCAB)
    tokens, weight, ids, probs, outside = padded_batch()
    packed, wanted, sel = pack_rows(tokens, LENGTHS, weight)
    teacher_logits = torch.randn(*ids.shape, generator=torch.Generator().manual_seed(4)).half()
    for loss, labels in ((tail_loss, (ids, probs, outside)), (distill_loss, (ids, teacher_logits))):
        ref = loss(draft.forward_train(tokens).float(), *labels, weight, index)
        ref_grads = grads(draft, ref)
        out = loss(draft.forward_train(packed, tuple(LENGTHS), wanted).float(), *(x[sel] for x in labels),
                   weight[sel], index)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grads(draft, out), ref_grads)
        # negative control: the head one position off its labels
        off = loss(draft.forward_train(packed, tuple(LENGTHS), wanted + 1).float(), *(x[sel] for x in labels),
                   weight[sel], index)
        assert not torch.isclose(off, ref, rtol=1e-3)


def test_packed_input_of_the_wrong_length_is_refused():
    draft = tiny_model(1, VOCAB, output_token_ids=HEAD)
    with pytest.raises(ValueError, match=r"\[1, 9\]"):
        draft.forward_train(torch.zeros(1, 10, dtype=torch.long), (4, 5))
