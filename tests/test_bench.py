"""`saguaro bench` on the embedded pair: every mode incl. transformers' (JSON schema, plot), and one
tiny run of each analysis (fast: 1 short prompt, 8 tokens, in-process drafter)."""

import json
import math
from pathlib import Path

import pytest
import torch

from saguaro.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODES = ["ar", "sd", "ssd", "hf", "hf-assisted"]


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a small shared machine a second thread mostly waits (and CI has 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_all_modes_json_and_plot(tmp_path, capsys, embedded, one_thread):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--modes", ",".join(MODES), "--num-prompts", "2", "--max-tokens", "16", "--threads", "1",
                 "--json", str(out), "--plot", str(png)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    cfg = report["config"]
    assert cfg["modes"] == MODES and cfg["num_prompts"] == 2 and cfg["max_tokens"] == 16 and cfg["batch_size"] == 1
    assert set(report["results"]) == {"humaneval", "sharegpt"}
    for dataset, rows in report["results"].items():
        assert list(rows) == MODES
        for mode, r in rows.items():
            assert r["prompts"] == 2 and r["tokens"] > 0, (dataset, mode)
            for key in ("tokens_per_s", "ms_per_token_median", "ms_per_token_min", "ms_per_token_max",
                        "speedup_vs_ar", "speedup_vs_sd"):
                assert positive(r[key]), (dataset, mode, key, r.get(key))
            assert r["ms_per_token_min"] <= r["ms_per_token_median"] <= r["ms_per_token_max"]
            assert isinstance(r["identical_to_ar"], bool)
        for mode in ("sd", "ssd"):
            assert 0 <= rows[mode]["acceptance_rate"] <= 1 and rows[mode]["mean_accepted"] >= 0
            assert rows[mode]["identical_to_ar"] is True  # ours are exact; HF's are reported, not asserted
        assert 0 <= rows["ssd"]["cache_hit_rate"] <= 1
        assert rows["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert "hf-assisted" in capsys.readouterr().out  # the table
    assert_png(png)


# ---------------------------------------------------------------------------- analyses

@pytest.fixture(scope="module")
def llm(embedded, one_thread):
    from saguaro import LLM

    return LLM(mode="ar")


@pytest.fixture
def tiny_opts(tmp_path):
    from saguaro.analyses.common import AnalysisOptions

    return AnalysisOptions(out_dir=tmp_path, datasets=["sharegpt"], num_prompts=1, max_tokens=8, worker=False,
                           max_fanout=4, c_values=[0.0, 1.0], batch_sizes=[1, 2], ks=[2], fanout_sizes=[1],
                           temperatures=[0.0, 1.0])


CHECKS = {
    "hit-vs-fanout": lambda d: len(d["fanouts"]) == 4 and d["pooled"]["lookups"] > 0
    and all(0 <= h <= 1 for h in d["pooled"]["hit_rate"]),
    "c-sweep": lambda d: [p["c"] for p in d["points"]] == [0.0, 1.0] and all(positive(p["tokens_per_s"])
                                                                             for p in d["points"]),
    "fallback-batch": lambda d: [r["batch"] for r in d["measured"]["ngram"]] == [1, 2]
    and all(positive(r["tokens_per_s"]) for rows in d["measured"].values() for r in rows),
    "theorem7": lambda d: len(d["points"]) == 2 and all(positive(p["measured_speedup_vs_ar"]) for p in d["points"]),
    "fanout-shape": lambda d: {(p["shape"], p["temperature"]) for p in d["points"]}
    == {(s, t) for s in ("geometric", "uniform") for t in (0.0, 1.0)},
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_analysis_tiny_run(llm, tiny_opts, name):
    from saguaro.analyses import run_analysis

    out = run_analysis(name, llm, tiny_opts)
    report = json.loads(open(out["json"]).read())
    assert report["analysis"] == name.replace("-", "_") and report["options"]["max_tokens"] == 8
    assert CHECKS[name](report), report
    assert_png(Path(out["png"]))


@pytest.mark.parametrize("args, message", [
    (["--analysis", "z"], "unknown analysis"),
    (["--analysis", "b", "--c-values", "0,2"], "--c-values"),
    (["--modes", "ar,warp"], "unknown bench mode"),
])
def test_bench_bad_arguments(capsys, args, message):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- pieces

def test_power_law_fit_recovers_r():
    from saguaro.analyses.hit_vs_fanout import fit_miss_curve, hit_curve

    fanouts = list(range(1, 17))
    fit = fit_miss_curve(fanouts, [f ** -0.7 for f in fanouts])
    assert fit["r"] == pytest.approx(0.7, abs=1e-3)
    assert hit_curve([0, 2, None, 1], 3) == [0.25, 0.5, 0.75]


def test_reduced_head_is_minus_inf_outside_the_head():
    from saguaro.bench_hf import ReducedHead, cut_at_stop

    head = ReducedHead(torch.randn(3, 4), [5, 1, 7], vocab_size=10)
    logits = head(torch.randn(2, 4))
    assert logits.shape == (2, 10)
    assert torch.isinf(logits[:, [0, 2, 3, 4, 6, 8, 9]]).all() and torch.isfinite(logits[:, [1, 5, 7]]).all()
    assert set(logits.argmax(-1).tolist()) <= {1, 5, 7}
    assert cut_at_stop([4, 9, 2, 2, 8], {2}, 10) == [4, 9, 2] and cut_at_stop([4, 9, 3], {2}, 2) == [4, 9]


# ---------------------------------------------------------------------------- llama.cpp peer

def test_llamacpp_modes_parse():
    from saguaro.bench import parse_mode

    assert parse_mode("llamacpp") == ("llamacpp", None)
    assert parse_mode("llamacpp-f32") == ("llamacpp-f32", None)


def test_llamacpp_missing_is_a_one_line_error(monkeypatch, capsys):
    from saguaro.bench_llamacpp import MISSING

    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # `import llama_cpp` now fails
    assert main(["bench", "--modes", "ar,llamacpp-f32", "--num-prompts", "1"]) == 2
    assert capsys.readouterr().err == f"saguaro: error: {MISSING}\n"


def test_llamacpp_needs_a_gguf_target(tmp_path):
    from saguaro.bench_llamacpp import gguf_source

    with pytest.raises(ValueError, match="not a .gguf file"):
        gguf_source(tmp_path)


@pytest.fixture(scope="module")
def chat_prompt(embedded):
    return embedded[2].encode_chat([{"role": "user", "content": "What is the capital of France?"}])


def test_llamacpp_runner_on_the_embedded_gguf(embedded, chat_prompt):
    pytest.importorskip("llama_cpp")
    from saguaro.bench_llamacpp import LlamaCppRunner
    from saguaro.sampling import SamplingParams

    path, model, tok = embedded
    runner = LlamaCppRunner(path, tok.stop_token_ids, threads=1, n_ctx=512)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        sampled = SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)
        first, again = runner.generate([chat_prompt, chat_prompt], [greedy, greedy])
        one, two = runner.generate([chat_prompt, chat_prompt], [sampled, sampled])
    finally:
        runner.close()
    assert len(first) == 6 and all(0 <= t < model.config.vocab_size for t in first)
    assert first == again  # each prompt prefilled afresh, same result
    assert one == two and len(one) == 6


def test_llamacpp_f32_agrees_with_our_greedy_ar(llm, chat_prompt):
    """Same F32 weights, same arithmetic up to summation order: the first greedy tokens agree."""
    pytest.importorskip("llama_cpp")
    from saguaro.bench_llamacpp import LlamaCppRunner, f32_gguf
    from saguaro.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8)
    ours = llm.generate([chat_prompt], params)[0].token_ids
    runner = LlamaCppRunner(f32_gguf(Path(llm.target_path), threads=1), llm.tokenizer.stop_token_ids, 1, 512)
    try:
        theirs = runner.generate([chat_prompt], [params])[0]
    finally:
        runner.close()
    assert theirs == ours
