"""Teacher forcing on tiny random models: shards hold the target's own top-k and tail, the tail loss is
minimised by a draft that matches the teacher, the writer and trainer resume, and the T=1 acceptance
is 1 - TV."""

import pytest
import torch

from saguaro.distill.corpora import (Text, grouped, looks_heldout, python_items, render_turn, sharegpt_turns,
                                     windows)
from saguaro.distill.evaluate import acceptance_t1, expected_acceptance, target_probs
from saguaro.distill.forced import (corpus_stats, force_shard, onpolicy_items, pin_stream_settings, read_index,
                                    read_labels, resume_cursor, run_teacher_force, score_batch)
from saguaro.distill.run import parse_corpus
from saguaro.distill.teacher import read_shard, shard_paths, write_shard
from saguaro.distill.train import Trainer, tail_loss, target_to_draft_index, teacher_buckets
from saguaro.engine.speculators import head_to_vocab
from saguaro.prompts import SHAREGPT_EVAL_EVERY
from tests.tiny import tiny_model

VOCAB, K = 32, 6
HEAD = list(range(0, VOCAB, 2))


def texts(n: int, seed: int = 0) -> list[Text]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 24, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Text(torch.randint(0, VOCAB, (length,), generator=g).tolist(), prompt))
    return out


def one_per_item(items: list[Text], cursor: int):
    return ((i, [items[i]]) for i in range(cursor, len(items)))


def source(items: list[Text], rows: int):
    return lambda cursor: grouped(one_per_item(items, cursor), rows)


# --------------------------------------------------------------------------------------------- shards
def test_forced_shard_holds_the_targets_topk_and_tail():
    target = tiny_model(0, VOCAB)
    items = texts(7)
    shard = force_shard(target, items, K, batch_tokens=40)
    n, m = len(items), sum(t.labels for t in items)
    assert shard["tokens"].shape == (n, max(len(t.tokens) for t in items))
    assert shard["label_offsets"].tolist()[-1] == m and shard["topk_ids"].shape == (m, K)
    assert shard["topk_logprobs"].shape == (m, K) and shard["outside_mass"].shape == (m,)
    total = shard["topk_logprobs"].float().exp().sum(-1) + shard["outside_mass"]
    assert torch.allclose(total, torch.ones(m), atol=1e-5)
    # each row's labels are the target's distribution at its own positions (rows are in length order)
    for r in range(n):
        end, first = int(shard["ends"][r]), int(shard["prompt_lengths"][r]) - 1
        ref = torch.log_softmax(target.forward_train(shard["tokens"][r : r + 1, :end].long())[0].float(), -1)
        a, b = int(shard["label_offsets"][r]), int(shard["label_offsets"][r + 1])
        top = torch.topk(ref[first : end - 1], K)
        assert torch.equal(shard["topk_ids"][a:b].long(), top.indices)
        assert torch.allclose(shard["topk_logprobs"][a:b].float(), top.values, atol=1e-2)


def test_a_bfloat16_teacher_writes_the_same_labels_to_its_rounding():
    """`--teacher-dtype bfloat16`: the shard is well formed (top-k + outside sums to 1) and its labels are
    the float target's up to bfloat16's rounding of weights and activations."""
    target = tiny_model(0, VOCAB)
    items = texts(5)
    want = force_shard(target.float(), items, K, batch_tokens=40)
    got = force_shard(tiny_model(0, VOCAB).to(torch.bfloat16), items, K, batch_tokens=40)
    m = int(want["label_offsets"][-1])
    total = got["topk_logprobs"].float().exp().sum(-1) + got["outside_mass"]
    assert torch.allclose(total, torch.ones(m), atol=1e-3)
    same = got["topk_ids"][:, 0] == want["topk_ids"][:, 0]
    assert same.float().mean() > 0.9
    gap = (got["topk_logprobs"][:, 0].float() - want["topk_logprobs"][:, 0].float())[same].abs()
    assert gap.median() < 0.05  # this tiny model's weights are large (scale 0.5): a few positions move more


def test_chunked_batched_scoring_matches_one_sequence_at_a_time():
    target = tiny_model(1, VOCAB)
    items = texts(4, seed=3)
    together = score_batch(target, items, K, chunk=5)
    for item, got in zip(items, together):
        alone = score_batch(target, [item], K, chunk=64)[0]
        assert torch.equal(got[0], alone[0]) and torch.allclose(got[2], alone[2], atol=1e-6)


def test_packed_labels_read_back_by_row(tmp_path):
    shard = force_shard(tiny_model(0, VOCAB), texts(5), K)
    path = write_shard(tmp_path, 0, shard, metadata={"wall_s": "1.5", "scored_tokens": "10"})
    index = read_index(path)
    assert int(index["k"]) == K and torch.equal(index["label_offsets"], shard["label_offsets"])
    a, b = int(index["label_offsets"][2]), int(index["label_offsets"][3])
    assert torch.equal(read_labels(path, a, b)[0], shard["topk_ids"][a:b])
    assert corpus_stats(tmp_path)["tokens_per_s"] == pytest.approx(10 / 1.5)


# --------------------------------------------------------------------------------------------- resume
def test_teacher_forcing_resumes_at_the_next_shard(tmp_path):
    target = tiny_model(0, VOCAB)
    items = {"a": texts(10, seed=1), "b": texts(5, seed=2)}
    sources = {name: source(x, 3) for name, x in items.items()}
    run_teacher_force(target, sources, tmp_path / "whole", K)

    def crashing(cursor):  # dies when asked for its third group
        for i, (next_cursor, group) in enumerate(grouped(one_per_item(items["a"], cursor), 3)):
            if i == 2:
                raise RuntimeError("killed")
            yield next_cursor, group

    with pytest.raises(RuntimeError):
        run_teacher_force(target, {"a": crashing, "b": sources["b"]}, tmp_path / "resumed", K)
    assert len(shard_paths(tmp_path / "resumed" / "a")) == 2 and resume_cursor(tmp_path / "resumed" / "a") == 6
    stats = run_teacher_force(target, sources, tmp_path / "resumed", K)
    assert stats["a"]["shards"] == 4 and stats["b"]["shards"] == 2
    for name in items:
        for whole, resumed in zip(shard_paths(tmp_path / "whole" / name), shard_paths(tmp_path / "resumed" / name),
                                  strict=True):
            assert torch.equal(read_shard(whole)["topk_ids"], read_shard(resumed)["topk_ids"])


def test_a_work_dir_resumes_only_with_the_settings_of_its_streams(tmp_path):
    pin_stream_settings(tmp_path, {"seed": 0, "window": 512})
    pin_stream_settings(tmp_path, {"seed": 0, "window": 512})
    with pytest.raises(ValueError, match="another --work-dir"):
        pin_stream_settings(tmp_path, {"seed": 1, "window": 512})


def test_onpolicy_shards_are_rescored_one_for_one(tmp_path):
    tokens = torch.randint(0, VOCAB, (3, 12)).int()
    generated = {"tokens": tokens, "prompt_lengths": torch.tensor([4, 5, 12]).int(),
                 "ends": torch.tensor([12, 9, 12]).int()}
    write_shard(tmp_path / "teacher", 0, generated)
    items = list(onpolicy_items(tmp_path / "teacher"))
    assert [i for i, _ in items] == [0] and [t.labels for t in items[0][1]] == [8, 4, 0]
    shard = force_shard(tiny_model(0, VOCAB), items[0][1], K)
    assert shard["tokens"].shape[0] == 2  # the row without generated tokens has nothing to label
    assert list(onpolicy_items(tmp_path / "teacher", start=1)) == []
    write_shard(tmp_path / "teacher", 1, generated)  # written meanwhile: picked up
    assert [i for i, _ in onpolicy_items(tmp_path / "teacher", start=1)] == [1]


# --------------------------------------------------------------------------------------------- loss
def teacher_example():
    """Teacher buckets at 3 positions; top-k token 1 is not in the head, so its mass is the draft's "rest"."""
    ids = torch.tensor([[[0, 2, 1], [4, 6, 8], [2, 0, 10]]])
    probs = torch.tensor([[[0.5, 0.2, 0.1], [0.3, 0.3, 0.1], [0.6, 0.1, 0.05]]])
    outside = 1 - probs.sum(-1)
    return ids, probs, outside, torch.ones(1, 3), target_to_draft_index(torch.tensor(HEAD), VOCAB)


def matching_logits(ids, probs, outside, index) -> torch.Tensor:
    """Draft logits whose buckets equal the teacher's: the rest spread evenly over the other head tokens."""
    draft_ids, p_in, p_rest = teacher_buckets(ids, probs, outside, index)
    q = torch.zeros(*ids.shape[:-1], len(HEAD))
    for pos in range(ids.shape[1]):
        mine = draft_ids[0, pos][draft_ids[0, pos] >= 0]
        others = [j for j in range(len(HEAD)) if j not in mine.tolist()]
        q[0, pos, others] = p_rest[0, pos] / len(others)
        q[0, pos, mine] = p_in[0, pos][draft_ids[0, pos] >= 0]
    return q.log()


def test_teacher_buckets_put_tokens_off_the_head_into_the_rest():
    ids, probs, outside, _, index = teacher_example()
    draft_ids, p_in, p_rest = teacher_buckets(ids, probs, outside, index)
    assert draft_ids[0, 0].tolist() == [0, 1, -1]
    assert p_in[0, 0].tolist() == pytest.approx([0.5, 0.2, 0.0]) and float(p_rest[0, 0]) == pytest.approx(0.3)
    assert torch.allclose(p_in.sum(-1) + p_rest, torch.ones(1, 3))


def test_tail_loss_is_zero_with_zero_gradient_at_the_teacher():
    ids, probs, outside, weight, index = teacher_example()
    logits = matching_logits(ids, probs, outside, index).requires_grad_()
    loss = tail_loss(logits, ids, probs, outside, weight, index)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad.abs().max() < 1e-6
    other = torch.randn(1, 3, len(HEAD))
    assert tail_loss(other, ids, probs, outside, weight, index) > 0.01


def test_tail_loss_descent_reaches_the_teacher_buckets():
    ids, probs, outside, weight, index = teacher_example()
    logits = torch.zeros(1, 3, len(HEAD), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(300):
        loss = tail_loss(logits, ids, probs, outside, weight, index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 < losses[0]
    draft_ids, p_in, p_rest = teacher_buckets(ids, probs, outside, index)
    q = torch.softmax(logits.detach(), -1)
    got = q.gather(-1, draft_ids.clamp_min(0)) * (draft_ids >= 0)
    assert torch.allclose(got, p_in, atol=0.02)
    assert torch.allclose(1 - got.sum(-1), p_rest, atol=0.02)  # the tail is kept, not piled onto the top-k


def test_tv_loss_is_one_minus_the_bucketed_t1_acceptance():
    """tv_loss = 1 - sum over buckets of min(p, q): zero at the teacher's buckets, the acceptance's complement
    elsewhere (negative control: a draft off the teacher loses exactly what it does not accept)."""
    from saguaro.distill.train import tv_loss

    ids, probs, outside, weight, index = teacher_example()
    assert tv_loss(matching_logits(ids, probs, outside, index), ids, probs, outside, weight, index).item() \
        == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(1, 3, len(HEAD), generator=torch.Generator().manual_seed(2))
    draft_ids, p_in, p_rest = teacher_buckets(ids, probs, outside, index)
    q = torch.softmax(other, -1)
    q_in = q.gather(-1, draft_ids.clamp_min(0)) * (draft_ids >= 0)
    accepted = torch.minimum(p_in, q_in).sum(-1) + torch.minimum(p_rest, 1 - q_in.sum(-1))
    assert tv_loss(other, ids, probs, outside, weight, index).item() == pytest.approx(1 - accepted.mean().item())
    assert accepted.mean() < 0.9


# --------------------------------------------------------------------------------------------- trainer
def forced_trainer(tmp_path, weights: dict[str, float], loss: str = "tail") -> Trainer:
    target = tiny_model(0, VOCAB)
    sources = {name: source(texts(12, seed=i), 6) for i, name in enumerate(weights)}
    if not (tmp_path / "forced").is_dir():
        run_teacher_force(target, sources, tmp_path / "forced", K)
    draft = tiny_model(3, VOCAB, output_token_ids=HEAD).float()
    return Trainer(draft, {tmp_path / "forced" / n: w for n, w in weights.items()}, tmp_path / "state", seed=0,
                   lr=1e-2, batch_size=6, warmup=1, loss=loss)


def test_the_topk_loss_on_forced_shards_is_the_generated_shards_loss_over_the_stored_topk(tmp_path):
    """--loss topk: the soft cross-entropy over the top-k renormalised on the head, which leaves the tail out;
    it learns, and it is not the tail loss (negative control: on the same batch the two differ)."""
    tr = forced_trainer(tmp_path, {"a": 1.0}, loss="topk")
    tr.refresh_shards()
    weight, forward, loss_of = tr.next_batch()
    out = forward(tr.draft)
    topk = loss_of(out)
    tail = forced_trainer(tmp_path, {"a": 1.0}, loss="tail")
    tail.refresh_shards()
    assert not torch.isclose(topk, tail.next_batch()[2](out))
    losses = [tr.train_step() for _ in range(25)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="loss must be one of"):
        forced_trainer(tmp_path, {"a": 1.0}, loss="kl")


def test_trainer_learns_from_forced_shards_and_resumes(tmp_path):
    tr = forced_trainer(tmp_path, {"a": 1.0, "b": 1.0})
    assert tr.refresh_shards() == 24 and tr.forced
    losses = [tr.train_step() for _ in range(25)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    tr.save_state()
    again = forced_trainer(tmp_path, {"a": 1.0, "b": 1.0})
    again.refresh_shards()
    assert again.load_state() and again.step == tr.step
    assert tr.train_step() == pytest.approx(again.train_step())


def test_trainer_mixes_corpora_by_weight(tmp_path):
    tr = forced_trainer(tmp_path, {"a": 3.0, "b": 1.0})
    tr.refresh_shards()
    picks = []
    for step in range(200):
        tr.step = step
        picks += [tr._shard_source[s] for s, _ in tr.next_rows()]
    share = picks.count(0) / len(picks)
    assert 0.7 < share < 0.8


def test_trainer_refuses_to_mix_forced_and_generated_shards(tmp_path):
    tr = forced_trainer(tmp_path, {"a": 1.0})
    write_shard(tmp_path / "teacher", 0, {"tokens": torch.zeros(1, 4).int(), "ends": torch.tensor([4]),
                                          "prompt_lengths": torch.tensor([1]),
                                          "topk_ids": torch.zeros(1, 4, 2).int(),
                                          "topk_logits": torch.zeros(1, 4, 2).half()})
    tr.sources[tmp_path / "teacher"] = 1.0
    with pytest.raises(ValueError, match="cannot be mixed"):
        tr.refresh_shards()


# --------------------------------------------------------------------------------------------- evaluation
def test_acceptance_at_t1_is_one_minus_total_variation():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.2, 0.2, 0.4])
    tv = 0.5 * float((p - q).abs().sum())  # 0.4
    assert float(expected_acceptance(p, q)) == pytest.approx(1 - tv) == pytest.approx(0.6)


def test_acceptance_t1_of_a_model_with_itself_is_one_and_a_reduced_head_loses_the_rest():
    target = tiny_model(0, VOCAB)
    shard = {"tokens": torch.randint(0, VOCAB, (2, 10)), "ends": torch.tensor([10, 8]),
             "prompt_lengths": torch.tensor([3, 4])}
    assert acceptance_t1(target, shard, target_probs(target, shard, None))["accept_t1"] == pytest.approx(1.0)
    reduced = tiny_model(0, VOCAB, output_token_ids=HEAD)
    with torch.no_grad():  # the target's own head rows: q is p renormalised on the head
        reduced.load_state_dict({k: v for k, v in target.state_dict().items() if k != "lm_head.weight"}, strict=False)
        reduced.lm_head.weight.copy_(target.lm_head.weight[HEAD])
    row = {k: v[:1] for k, v in shard.items()}
    tokens = shard["tokens"][0:1, :10].long()
    p = torch.softmax(target.forward_train(tokens)[0, 2:9].detach().double(), -1)
    mass = p[:, HEAD].sum(-1)  # q = p / mass on the head: min(p, q) = p there, so acceptance = head mass
    got = acceptance_t1(reduced, row, target_probs(target, row, reduced.output_token_ids))
    assert got["accept_t1"] == pytest.approx(float(mass.mean()), abs=1e-6) and got["positions"] == 7
    # p on the head only is the same as q expanded to the whole vocabulary with zeros off the head
    q = head_to_vocab(torch.softmax(reduced.forward_train(tokens)[0, 2:9].detach().double(), -1),
                      reduced.output_token_ids, VOCAB)
    assert float(expected_acceptance(p, q).mean()) == pytest.approx(got["accept_t1"], abs=1e-6)


# --------------------------------------------------------------------------------------------- corpora
class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def test_python_windows_skip_held_out_problems_and_follow_the_seed(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n" * 30)
    (tmp_path / "pkg" / "b.py").write_text("def fix_spaces(text):\n    return text\n" * 3)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_text("y = 2\n" * 30)  # another root's business
    marks = ["def fix_spaces("]
    items = list(python_items(ByteTokenizer(), 0, window=64, roots=[tmp_path / "pkg", tmp_path], fingerprints=marks))
    assert len(items) == 2  # a.py and b.py; c.py sits in a site-packages below a root
    got = [t for _, texts in items for t in texts]  # b.py defines a held-out function: no windows
    assert [len(t.tokens) for t in got] == [64, 64, 52] and all(t.prompt_length == 1 for t in got)
    again = list(python_items(ByteTokenizer(), 0, start=1, window=64, roots=[tmp_path / "pkg", tmp_path],
                              fingerprints=marks))
    assert again == items[1:]  # the same seed, the same order: a cursor resumes the stream
    assert looks_heldout("  def fix_spaces(s):", marks) and not looks_heldout("fix_spaces", marks)
    assert windows(list(range(100)), 40, min_size=30) == [list(range(40)), list(range(40, 80))]
    assert [w[0] for w in windows(list(range(100)), 10, min_size=1, most=4)] == [0, 20, 50, 70]


def test_grouped_keeps_items_whole_and_tells_the_next_cursor():
    t = Text([1, 2], 1)
    items = [(0, [t, t]), (1, []), (2, [t, t]), (3, [t])]
    assert [(c, len(g)) for c, g in grouped(iter(items), 3)] == [(3, 4), (4, 1)]


def test_parse_corpus():
    assert parse_corpus("sharegpt,python:0.5") == {"sharegpt": 1.0, "python": 0.5}
    with pytest.raises(ValueError):
        parse_corpus("wikipedia")


def test_sharegpt_turns_leave_held_out_conversations_out():
    turns = sharegpt_turns(0)
    assert len(turns) > 60_000 and all(c % SHAREGPT_EVAL_EVERY != 0 for c, _ in turns)
    assert turns == sharegpt_turns(0) and turns[:100] != sharegpt_turns(1)[:100]


@pytest.fixture(scope="module")
def tokenizer():
    from saguaro.embedded import embedded_target_path
    from saguaro.loader import resolve_checkpoint
    from saguaro.tokenizer import Tokenizer

    try:
        return Tokenizer.load(resolve_checkpoint(embedded_target_path()), [2])
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_sharegpt_turn_is_the_templates_answer_after_its_context(tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    text = render_turn(tokenizer, messages, "Blue.", max_context=256, max_len=512)
    assert text.tokens[: text.prompt_length] == tokenizer.encode_chat(messages)
    answer = tokenizer.decode(text.tokens[text.prompt_length:], skip_special_tokens=False)
    assert answer == "Blue.<|im_end|>"
    short = render_turn(tokenizer, messages, "Blue.", max_context=8, max_len=10)
    assert short.prompt_length == 8 and len(short.tokens) == 10


def test_text_teacher_writes_shards_teacher_forcing_reads_and_resumes(tmp_path, tokenizer):
    """`--phase teacher-text`: each shard holds its prompts and their continuations as `onpolicy_items`
    reads them; the sampling parameters follow (seed, shard); a second run continues after the last shard."""
    from saguaro.distill.text import run_text_teacher, shard_temperature

    calls = []

    def generate(prompts, params):  # a stand-in for the engine: a continuation of length 1 + i % 5
        calls.append(params)
        return [[p[-1]] * (1 + i % 5) for i, p in enumerate(prompts)]

    out = tmp_path / "teacher-text"
    stats = run_text_teacher(generate, tokenizer, out, ["humaneval"], seed=3, shard_prompts=4, max_shards=2)
    assert stats["shards"] == 2 and stats["new_tokens"] == 2 * (1 + 2 + 3 + 4)
    texts = [t for _, group in onpolicy_items(out) for t in group]
    assert len(texts) == 8
    for i, t in enumerate(texts):
        assert t.tokens[t.prompt_length :] == [t.tokens[t.prompt_length - 1]] * (1 + i % 4)
    temps = [shard_temperature(3, index, 0.6) for index in range(2)]
    assert [c[0].temperature for c in calls] == temps
    assert len({p.seed for c in calls for p in c}) == 8  # every request its own seed
    again = run_text_teacher(generate, tokenizer, out, ["humaneval"], seed=3, shard_prompts=4, max_shards=1)
    assert again["shards"] == 1 and len(shard_paths(out)) == 3


def test_teacher_forcing_scores_text_written_after_its_corpus_ran_dry(tmp_path, monkeypatch):
    """The on-policy corpus grows while the teacher runs: a dry stream is opened again on its next turn, and a
    followed corpus is waited for until nothing new comes (a dry stream used to be dropped for good)."""
    from saguaro.distill import forced

    target = tiny_model(0, VOCAB)
    growing = texts(2, seed=5)
    later = texts(2, seed=6)
    fixed = texts(4, seed=7)
    naps = []

    def nap(seconds):  # the text teacher writes its next shard while this one waits
        naps.append(seconds)
        growing.extend(later if len(naps) == 1 else [])

    monkeypatch.setattr(forced.time, "sleep", nap)
    sources = {"onpolicy": source(growing, 1), "python": source(fixed, 1)}
    stats = run_teacher_force(target, sources, tmp_path / "followed", K, follow={"onpolicy"}, poll_s=1.0,
                              max_shards=8)
    assert stats["onpolicy"]["shards"] == 4 and stats["python"]["shards"] == 4 and naps == [1.0]
    # a followed corpus with nothing new for follow_idle_s ends the run
    assert run_teacher_force(target, sources, tmp_path / "idle", K, follow={"onpolicy"}, follow_idle_s=0.0,
                             )["onpolicy"]["shards"] == 4 and naps == [1.0]
    # negative control: not followed, the on-policy corpus ends at what was there when it ran dry
    growing[:] = texts(2, seed=5)
    naps.clear()
    stats = run_teacher_force(target, sources, tmp_path / "unfollowed", K)
    assert stats["onpolicy"]["shards"] == 2 and naps == []


def test_teacher_forcing_scores_corpora_in_proportion_to_their_weights(tmp_path):
    target = tiny_model(0, VOCAB)
    items = {"a": texts(12, seed=1), "b": texts(12, seed=2)}
    sources = {name: source(x, 1) for name, x in items.items()}
    stats = run_teacher_force(target, sources, tmp_path, K, weights={"a": 3.0, "b": 1.0}, max_shards=8)
    assert (stats["a"]["shards"], stats["b"]["shards"]) == (6, 2)
