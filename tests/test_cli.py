"""The command line: the JSON contract and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from saguaro.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("prompts", [["def add(a, b):"], ["def add(a, b):", "Hello"]])
def test_generate_json_on_embedded(capsys, embedded, prompts):
    """The default mode (auto) on a CPU: one greedy row starts by timing SD on every core (then AR), and a
    batch runs AR (engine/auto.py); the process keeps its cores and threads."""
    import os

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    code, out, err = run_cli(capsys, "generate", "--json", "--max-tokens", "6", "--ignore-eos", *prompts)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(prompts)
    for row in rows:
        assert len(row["token_ids"]) == 6 and isinstance(row["text"], str)
        assert row["metrics"]["tokens_per_s"] > 0
        if len(prompts) == 1:
            assert row["metrics"]["mode"] in ("sd", "sd+ar")
            assert row["metrics"]["auto_reason"].startswith("greedy: ")  # timing or choosing by time
            assert "measur" in row["metrics"]["auto_reason"]
        else:
            assert row["metrics"]["mode"] == "ar" and "batch" in row["metrics"]["auto_reason"]
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-0.5", "x"], "temperature"),
    (["--top-p", "0", "x"], "top_p"),
    (["--top-p", "1.5", "x"], "top_p"),
    (["--max-tokens", "0", "x"], "max_tokens"),
    (["--presence-penalty", "3", "x"], "presence_penalty"),
    (["--min-p", "1.5", "x"], "min_p"),
    (["--repetition-penalty", "0", "x"], "repetition_penalty"),
    (["--logprobs", "21", "x"], "logprobs"),
    (["--mode", "ar", "--logit-bias", "99999999=1", "x"], "logit_bias"),
    ([], "no prompts"),
    ([""], "empty"),
    (["--target", "/definitely/not/here", "x"], "no such file"),
    (["--mode", "ssd", "--draft-cores", "4096", "x"], "not among this process's cores"),
])
def test_bad_input_is_one_line_error(capsys, args, message):
    code, _, err = run_cli(capsys, "generate", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_distill_grow_without_a_draft_to_grow_is_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "distill", "--out", str(tmp_path / "d"), "--phase", "train", "--grow-from", "2,3")
    assert code == 2 and "--init-from" in err and len(err.strip().splitlines()) == 1


def test_distill_anneal_outside_training_is_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "distill", "--out", str(tmp_path / "d"), "--phase", "teacher", "--anneal", "50")
    assert code == 2 and "--phase train" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("stops", [["("], ["return", " if"]])
def test_generate_stop_ends_generation(capsys, embedded, stops):
    """`--stop` (repeatable): generation ends at the first stop string, finish_reason "stop", the text
    stops before it and the token ids end where the text ends."""
    tokenizer = embedded[2]
    flags = [arg for s in stops for arg in ("--stop", s)]
    code, out, err = run_cli(capsys, "generate", "--json", "--mode", "ar", "--max-tokens", "24", *flags,
                             "def fibonacci")
    assert code == 0, err
    row = json.loads(out)
    assert row["finish_reason"] == "stop"
    assert not any(s in row["text"] for s in stops)
    assert tokenizer.decode(row["token_ids"]) == row["text"] and len(row["token_ids"]) < 24


def test_generate_n_logprobs_and_penalties(capsys, embedded):
    """`--n`, `--logprobs` and the penalties reach the engine: choices under "choices", seeded per choice,
    the greedy token the top of its log-probs, a banned token never emitted."""
    tokenizer = embedded[2]
    args = ["generate", "--json", "--mode", "ar", "--max-tokens", "6", "--ignore-eos", "def fibonacci"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    first = json.loads(out)["token_ids"][0]
    code, out, err = run_cli(capsys, *args, "--logprobs", "2", "--frequency-penalty", "1.5",
                             "--logit-bias", f"{first}=-100")
    assert code == 0, err
    row = json.loads(out)
    assert first not in row["token_ids"] and "choices" not in row
    for t, lp in zip(row["token_ids"], row["logprobs"]):
        assert lp["token_id"] == t == lp["top_logprobs"][0][0] and lp["logprob"] == lp["top_logprobs"][0][1]
        assert lp["token"] == tokenizer.decode([t]) and len(lp["top_logprobs"]) == 2
    sampled = ["--temperature", "1.0", "--seed", "5", "--n", "3"]
    code, out, err = run_cli(capsys, *args, *sampled)
    assert code == 0, err
    row = json.loads(out)
    assert len(row["choices"]) == 3 and row["choices"][0]["token_ids"] == row["token_ids"]
    assert len({tuple(c["token_ids"]) for c in row["choices"]}) > 1
    code, again, _ = run_cli(capsys, *args, *sampled)
    assert json.loads(again)["choices"] == row["choices"]  # reproducible


def test_prompt_longer_than_context(capsys, embedded):
    long_prompt = "word " * 9000
    code, _, err = run_cli(capsys, "generate", long_prompt)
    assert code == 2 and "context" in err and "Traceback" not in err


def test_corrupt_checkpoint_from_a_real_process(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    proc = subprocess.run([sys.executable, "-m", "saguaro.cli", "generate", "--target", str(tmp_path), "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("saguaro: error:") and "Traceback" not in proc.stderr


def test_draft_cores_must_be_ours_and_leave_the_target_one():
    from saguaro.engine.ssd_setup import _check_draft_cores

    _check_draft_cores([3], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="not among"):
        _check_draft_cores([7], [0, 1])
    with pytest.raises(ValueError, match="leave no core"):
        _check_draft_cores([0, 1], [0, 1])
