"""The distillation trainer on a tiny draft and synthetic teacher data: it learns, in float32 and under
bfloat16 autocast, and a resumed run continues from the saved state."""

import pytest
import torch

from saguaro.distill.teacher import write_shard
from saguaro.distill.train import Trainer
from tests.tiny import tiny_model

VOCAB, ROWS, LENGTH, TOPK = 32, 6, 20, 4
HEAD = list(range(0, VOCAB, 2))  # a reduced head, as the shipped draft has


def teacher_shard() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    topk_ids = torch.stack([torch.randperm(VOCAB, generator=g)[:TOPK] for _ in range(ROWS * LENGTH)])
    return {"tokens": tokens.int(), "ends": torch.full((ROWS,), LENGTH), "prompt_lengths": torch.full((ROWS,), 4),
            "topk_ids": topk_ids.view(ROWS, LENGTH, TOPK).int(),
            "topk_logits": torch.randn(ROWS, LENGTH, TOPK, generator=g).half() * 3}


def trainer(tmp_path, bf16: bool) -> Trainer:
    draft = tiny_model(3, VOCAB, output_token_ids=HEAD).float()
    write_shard(tmp_path / "teacher", 0, teacher_shard())
    tr = Trainer(draft, tmp_path / "teacher", tmp_path / "state", seed=0, lr=1e-2, batch_size=ROWS, warmup=1,
                 bf16=bf16)
    assert tr.refresh_shards() == ROWS
    return tr


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_learns_the_teacher(tmp_path, bf16):
    tr = trainer(tmp_path, bf16)
    losses = [tr.train_step() for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_resumed_trainer_continues_from_saved_state(tmp_path):
    tr = trainer(tmp_path, bf16=False)
    for _ in range(3):
        tr.train_step()
    tr.save_state()
    again = trainer(tmp_path, bf16=False)
    assert again.load_state() and (again.step, again.tokens_seen) == (tr.step, tr.tokens_seen)
    for (name, p), q in zip(tr.draft.named_parameters(), again.draft.parameters()):
        assert torch.equal(p, q), name
    assert tr.train_step() == pytest.approx(again.train_step())  # same batch, same state: same loss


def test_trainer_waits_for_teacher_data_past_max_epochs(tmp_path):
    tr = trainer(tmp_path, bf16=False)
    start = tr.tokens_seen
    assert not tr.data_exhausted(start, max_epochs=2.0)
    while not tr.data_exhausted(start, max_epochs=2.0):
        tr.train_step()
    assert tr.tokens_seen - start >= 2 * tr.teacher_tokens()
    assert not tr.data_exhausted(start, max_epochs=None)


def test_a_grown_draft_starts_as_the_trained_one_and_learns_its_new_layers(tmp_path):
    from saguaro.distill.draft import grow_draft

    target = tiny_model(1, VOCAB, layers=4)
    draft = tiny_model(3, VOCAB, output_token_ids=HEAD)
    draft.embed.weight = target.embed.weight  # borrowed, as the shipped draft's are
    grown = grow_draft(draft, target, [2, 3])
    assert grown.config.num_layers == 4
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(grown.forward_train(tokens), draft.forward_train(tokens))
    # negative control: the same layers with their residual branches kept change the function
    kept = grow_draft(draft, target, [2, 3])
    with torch.no_grad():
        kept.layers[3].mlp.down.weight.copy_(target.layers[3].mlp.down.weight)
    assert not torch.allclose(kept.forward_train(tokens), draft.forward_train(tokens))

    write_shard(tmp_path / "teacher", 0, teacher_shard())
    tr = Trainer(grown.float(), tmp_path / "teacher", tmp_path / "state", seed=0, lr=1e-2, batch_size=ROWS, warmup=1)
    tr.refresh_shards()
    for _ in range(3):
        tr.train_step()
    assert tr.draft.layers[3].mlp.down.weight.abs().sum() > 0  # the new branches learn


def test_sigterm_stops_training_at_a_step_with_its_state_saved(tmp_path):
    """`kill PID` at the end of a session: the run ends after the step it is in, saves its state there, and
    a resumed trainer starts at that step (not at the last 5-minute save); the handler is put back."""
    import os
    import signal

    tr = trainer(tmp_path, bf16=False)

    def on_step(t, loss):
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    tr.run(tr.tokens_seen + 20 * ROWS * LENGTH, save_every_s=1e9, on_step=on_step)  # 20+ steps unstopped
    assert tr.step == 3 and signal.getsignal(signal.SIGTERM) is before
    again = trainer(tmp_path, bf16=False)
    assert again.load_state() and again.step == 3


def test_an_anneal_lowers_the_rate_to_zero_and_ends_the_run_there(tmp_path):
    tr = trainer(tmp_path, bf16=False)
    for _ in range(2):
        tr.train_step()
    tr.anneal = (tr.step, 4)
    rates = [tr.lr_at(step) for step in range(tr.step, tr.step + 4)]
    assert rates == sorted(rates, reverse=True) and rates[0] < tr.lr and rates[-1] == pytest.approx(tr.lr / 5)
    tr.run(tr.tokens_seen + 100 * ROWS * LENGTH, save_every_s=1e9)  # ends at the anneal, far before its tokens
    assert tr.step == 6 and tr.annealed()
    again = trainer(tmp_path, bf16=False)
    assert again.load_state() and again.anneal == (2, 4)  # a resumed anneal keeps its line
    # negative control: without an anneal the rate stays where warm-up left it
    assert trainer(tmp_path / "plain", bf16=False).lr_at(50) == tr.lr


def test_an_anneal_branches_off_the_run_and_leaves_its_state_alone(tmp_path):
    from saguaro.distill.run import DistillOptions, start_trainer

    tr = trainer(tmp_path, bf16=False)
    for _ in range(3):
        tr.train_step()
    tr.save_state()
    saved = {f.name: f.read_bytes() for f in (tmp_path / "state").iterdir()}
    opts = DistillOptions(target="unused", out=tmp_path / "out", data=[], tokens=10**6, anneal=2)
    branch = trainer(tmp_path, bf16=False)
    start_trainer(branch, opts)
    assert branch.state_dir == tmp_path / "state-anneal" and (branch.step, branch.anneal) == (3, (3, 2))
    for (name, p), q in zip(tr.draft.named_parameters(), branch.draft.parameters()):
        assert torch.equal(p, q), name
    branch.run(branch.tokens_seen + 100 * ROWS * LENGTH, save_every_s=1e9)
    assert branch.step == 5
    assert {f.name: f.read_bytes() for f in (tmp_path / "state").iterdir()} == saved  # the run's state untouched
    resumed = trainer(tmp_path, bf16=False)
    start_trainer(resumed, opts)  # a restarted anneal resumes its own state, on its own line
    assert (resumed.step, resumed.anneal, resumed.annealed()) == (5, (3, 2), True)
    # negative control: without --anneal the same start resumes the run itself, at step 3
    plain = trainer(tmp_path, bf16=False)
    start_trainer(plain, DistillOptions(target="unused", out=tmp_path / "out", data=[], tokens=10**6))
    assert (plain.state_dir, plain.step, plain.anneal) == (tmp_path / "state", 3, None)


def test_t1_references_are_kept_and_reread_for_the_same_target_shard_and_head(tmp_path, monkeypatch):
    from saguaro.distill import run

    target = tiny_model(1, VOCAB, layers=2)
    draft = tiny_model(3, VOCAB, output_token_ids=HEAD)
    shards = {"humaneval": teacher_shard()}
    first = run.t1_references(target, draft, shards, tmp_path)
    monkeypatch.setattr(run, "target_probs", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run.t1_references(target, draft, shards, tmp_path)
    assert len(again["humaneval"]) == len(first["humaneval"]) == ROWS
    assert all(torch.equal(a, b) for a, b in zip(again["humaneval"], first["humaneval"]))
    # negative controls: another head, or a target differing only inside a layer, is computed anew
    other = tiny_model(3, VOCAB, output_token_ids=HEAD[:-1])
    with pytest.raises(AssertionError, match="recomputed"):
        run.t1_references(target, other, shards, tmp_path)
    with torch.no_grad():
        target.layers[1].mlp.down.weight.mul_(2)
    with pytest.raises(AssertionError, match="recomputed"):
        run.t1_references(target, draft, shards, tmp_path)
