"""What serving costs one client: `saguaro serve` against `LLM()` on the same chat request.

`LLM(mode=...)` generates in a child process of its own (one warm-up, then timed runs), then the
server starts and one official `openai` client sends the identical request (streamed and not) the
same number of times; the two never run at once, and the order alternates per repetition (A B, B A)
so machine drift hits both alike. Both use the default dtype and compiled step and the same torch
threads. tokens/s is the client's (or the caller's) wall time, prompt to last token, for a fixed
number of tokens (ignore_eos); the ratio is server over LLM, medians over all timed runs.

    python benchmarks/serve_overhead.py --mode ar --max-tokens 96 --repeats 3 \
        --json docs/results/serve_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import cpu_meta, start_server, stop_server  # noqa: E402

from saguaro.prompts import load_prompts  # noqa: E402

log = logging.getLogger("serve_overhead")


class OtherCPU:
    """How many cores the machine spent outside `pids` while the block ran (another job skews the run:
    on 2 cores it can cost a spinning OpenMP team most of its speed)."""

    def __init__(self, pids: list[int]):
        self.pids, self.cores = pids, 0.0

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_ticks(), _own_ticks(self.pids)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        others = (_busy_ticks() - self.busy0) - (_own_ticks(self.pids) - self.own0)
        self.cores = max(0.0, others / os.sysconf("SC_CLK_TCK") / wall)


def _busy_ticks() -> int:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _own_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
    return total


def timed(run, pids: list[int], max_other: float, tries: int = 3) -> dict:
    """run() -> a result dict, with `other_cores` added; run again (at most `tries` times in all) while other
    jobs used more than `max_other` cores meanwhile."""
    for attempt in range(1, tries + 1):
        with OtherCPU(pids) as other:
            result = run()
        if other.cores <= max_other:
            break
        log.warning("other jobs used %.2f cores during a timed run (try %d of %d)", other.cores, attempt, tries)
    return {**result, "other_cores": other.cores, "tries": attempt}


def request(args) -> dict:
    """The one chat request both sides answer."""
    prompt = load_prompts("sharegpt", "eval")[args.prompt]
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "temperature": 0.0}


def direct(args) -> dict:
    """Child process: time LLM.generate on the request (run as `--direct`)."""
    from saguaro import LLM, SamplingParams

    req = request(args)
    params = SamplingParams(temperature=req["temperature"], max_tokens=req["max_tokens"], ignore_eos=True)
    with LLM(mode=args.mode, threads=args.threads) as llm:
        ids = llm.tokenizer.encode_chat(req["messages"])
        llm.generate([ids], params)  # warm-up

        def run() -> dict:
            t0 = time.perf_counter()
            out = llm.generate([ids], params)[0]
            return {"tokens_per_s": len(out.token_ids) / (time.perf_counter() - t0), "text": out.text,
                    "dtype": out.metrics["dtype"], "compiled": out.metrics["compiled"]}

        return {"runs": [timed(run, [os.getpid()], args.max_other_cores) for _ in range(args.runs)]}


def run_direct(args) -> dict:
    cmd = [sys.executable, __file__, "--direct", "--mode", args.mode, "--threads", str(args.threads),
           "--max-tokens", str(args.max_tokens), "--runs", str(args.runs), "--prompt", str(args.prompt),
           "--max-other-cores", str(args.max_other_cores)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise RuntimeError(f"LLM() run failed (status {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_request(client: OpenAI, model: str, req: dict, stream: bool) -> tuple[float, int, str]:
    """(seconds, completion tokens, text) of one request, prompt to last chunk."""
    t0 = time.perf_counter()
    extra = {"extra_body": {"ignore_eos": True}}
    if not stream:
        reply = client.chat.completions.create(model=model, **req, **extra)
        return time.perf_counter() - t0, reply.usage.completion_tokens, reply.choices[0].message.content
    parts, tokens = [], 0
    for chunk in client.chat.completions.create(model=model, **req, stream=True,
                                                stream_options={"include_usage": True}, **extra):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, tokens, "".join(parts)


def run_server(args) -> dict:
    flags = ["--mode", args.mode, "--threads", str(args.threads)]
    if args.stream_interval_ms is not None:
        flags += ["--stream-interval-ms", str(args.stream_interval_ms)]
    proc = start_server(flags, args.port, timeout_s=900)  # the first start may build the compiled step
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        req = request(args)
        one_request(client, model, req, stream=True)  # warm-up

        def run(stream: bool) -> dict:
            before = server_metrics(args.port)
            seconds, tokens, text = one_request(client, model, req, stream)
            after = server_metrics(args.port)
            step_s = (after["busy_s"] - before["busy_s"]) / (after["tokens_generated"] - before["tokens_generated"])
            return {"tokens_per_s": tokens / seconds, "engine_step_ms_per_token": 1000 * step_s, "text": text}

        runs = {kind: [] for kind in ("stream", "non_stream")}
        for _ in range(args.runs):
            for kind, out in runs.items():
                out.append(timed(lambda: run(kind == "stream"), [os.getpid(), proc.pid], args.max_other_cores))
        client.close()
        return {"runs": runs, "metrics": server_metrics(args.port)}
    finally:
        stop_server(proc)


def server_metrics(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/metrics").json()


def summarize(direct_runs: list[dict], server_runs: list[dict]) -> dict:
    """Medians over all timed runs; a server request's ms per token split into the engine's steps (forward,
    sampling, detokenizing) and the rest (HTTP, the hand-off between threads, the client)."""
    llm = [r for d in direct_runs for r in d["runs"]]
    base = statistics.median(r["tokens_per_s"] for r in llm)
    out = {"llm_tokens_per_s": base, "llm_ms_per_token": 1000 / base}
    served = []
    for kind in ("stream", "non_stream"):
        runs = [r for s in server_runs for r in s["runs"][kind]]
        served += runs
        med = statistics.median(r["tokens_per_s"] for r in runs)
        step = statistics.median(r["engine_step_ms_per_token"] for r in runs)
        out.update({f"serve_{kind}_tokens_per_s": med, f"serve_{kind}_over_llm": med / base,
                    f"serve_{kind}_ms_per_token": 1000 / med, f"serve_{kind}_engine_step_ms_per_token": step,
                    f"serve_{kind}_outside_steps_ms_per_token": 1000 / med - step})
    out["max_other_cores"] = max(r["other_cores"] for r in llm + served)
    out["same_text"] = all(r["text"] == llm[0]["text"] for r in llm + served)
    out["compiled"], out["dtype"] = llm[0]["compiled"], llm[0]["dtype"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="ar")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=0, help="which held-out ShareGPT prompt")
    ap.add_argument("--runs", type=int, default=3, help="timed requests per side and repetition")
    ap.add_argument("--repeats", type=int, default=3, help="LLM / server alternations")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--max-other-cores", type=float, default=0.2,
                    help="repeat a timed run (at most 3 tries) while other jobs used more cores than this")
    ap.add_argument("--stream-interval-ms", type=float, help="the server's (default: its own default)")
    ap.add_argument("--json")
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct:
        print(json.dumps(direct(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    direct_runs, server_runs = [], []
    for rep in range(args.repeats):
        for side in ("llm", "serve") if rep % 2 == 0 else ("serve", "llm"):
            if side == "llm":
                direct_runs.append(run_direct(args))
                runs = direct_runs[-1]["runs"]
                log.info("LLM(): %s tok/s (%s, compiled %s; other jobs: %s cores)", _fmt(runs, "tokens_per_s"),
                         runs[0]["dtype"], runs[0]["compiled"], _fmt(runs, "other_cores", 2))
            else:
                server_runs.append(run_server(args))
                for kind, runs in server_runs[-1]["runs"].items():
                    log.info("serve %s: %s tok/s (engine steps %s ms/token; other jobs: %s cores)", kind,
                             _fmt(runs, "tokens_per_s"), _fmt(runs, "engine_step_ms_per_token"),
                             _fmt(runs, "other_cores", 2))
    s = summarize(direct_runs, server_runs)
    print(f"LLM() {s['llm_tokens_per_s']:.1f} tok/s; serve stream {s['serve_stream_tokens_per_s']:.1f} "
          f"({s['serve_stream_over_llm']:.2f}x), non-stream {s['serve_non_stream_tokens_per_s']:.1f} "
          f"({s['serve_non_stream_over_llm']:.2f}x); same text: {s['same_text']}")
    print(f"ms/token: LLM() {s['llm_ms_per_token']:.1f}; serve stream {s['serve_stream_ms_per_token']:.1f} = engine "
          f"steps {s['serve_stream_engine_step_ms_per_token']:.1f} + outside them "
          f"{s['serve_stream_outside_steps_ms_per_token']:.1f}; other jobs used up to {s['max_other_cores']:.2f} cores")
    if args.json:
        result = {"meta": {**cpu_meta(), **code_version(), "threads": args.threads, "mode": args.mode,
                           "stream_interval_ms": args.stream_interval_ms, "max_tokens": args.max_tokens,
                           "prompt": request(args)["messages"][0]["content"]},
                  "summary": s, "llm": direct_runs, "serve": server_runs}
        Path(args.json).write_text(json.dumps(result, indent=1))


def code_version() -> dict:
    """Which saguaro ran (PYTHONPATH may point at another checkout, to measure older code)."""
    import saguaro

    src = Path(saguaro.__file__).resolve().parent
    git = ["git", "-C", str(src)]
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True).stdout)
    return {"saguaro": str(src), "commit": head, "dirty": dirty}


def _fmt(runs: list[dict], key: str, digits: int = 1) -> str:
    return ", ".join(f"{r[key]:.{digits}f}" for r in runs)


if __name__ == "__main__":
    main()
