"""The vLLM-style Python API and the bench command on the embedded target (small and quick)."""

import json

import pytest

from saguaro import LLM, SamplingParams
from saguaro.cli import main


@pytest.fixture(scope="module")
def llm(embedded):
    return LLM(mode="ar")


def test_generate_returns_text_ids_metrics(llm):
    outs = llm.generate(["def add(a, b):", [504, 3145, 314]], SamplingParams(temperature=0, max_tokens=5,
                                                                               ignore_eos=True))
    assert len(outs) == 2
    for o in outs:
        assert len(o.token_ids) == 5 and o.text == llm.tokenizer.decode(o.token_ids)
        assert o.outputs[0].finish_reason == "length" and o.metrics["tokens_per_s"] > 0


def test_chat_and_bad_arguments(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=8))
    assert out.token_ids
    with pytest.raises(ValueError):
        llm.generate([])
    with pytest.raises(ValueError):
        LLM(mode="warp")


def test_bench_smoke(tmp_path, capsys, embedded):
    out = tmp_path / "bench.json"
    code = main(["bench", "--modes", "ar,sd-ngram", "--num-prompts", "1", "--max-tokens", "8",
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    for dataset in ("humaneval", "sharegpt"):
        rows = report["results"][dataset]
        assert rows["ar"]["tokens_per_s"] > 0 and rows["sd-ngram"]["tokens_per_s"] > 0
        assert rows["sd-ngram"]["identical_to_ar"] is True
        assert rows["sd-ngram"]["speedup_vs_ar"] > 0


def test_auto_mode_weighs_sd_on_a_cpu_and_ssd_where_the_draft_has_hardware_of_its_own():
    from saguaro.llm import auto_mode

    assert auto_mode(True, "cpu", gpus=0) == "sd"
    assert auto_mode(True, "cpu", gpus=0, remote_worker=True) == "ssd"
    assert auto_mode(False, "cpu", gpus=0) == "ar"
    assert auto_mode(True, "cuda", gpus=1) == "ar"
    assert auto_mode(True, "cuda:0", gpus=2) == "ssd"
