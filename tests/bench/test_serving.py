"""The closed-loop serving benchmark (leaplm/bench/serving.py, serving_peers.py) with fake engines and a fake
llama-server: exact latency percentiles and tokens/s, the C-in-flight invariant, exact match vs alone, error
counting, the results schema, the llama-server client and process, and (slow) a real run on SmolLM2."""
from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from leaplm.bench import BenchError
from leaplm.bench import serving
from leaplm.bench.serving import (ROW_METRICS, LeapLMBackend, RequestRecord, Sweep, exact_match,
                                  itl_gaps, parse_concurrency, parse_serving_methods, percentile, run_closed_loop,
                                  run_metrics, run_sweep)
from leaplm.bench.serving_peers import LlamaServerBackend, LlamaServerProcess, find_llama_server
from leaplm.sampling import SamplingParams

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fake_llama_server  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
ERROR_ID = fake_llama_server.ERROR_ID


# --------------------------------------------------------------------------- fakes


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeEngine:
    """The LLMEngine API with scripted deliveries. A request for prompt ``p`` produces
    ``fake_llama_server.tokens_for(p, max_tokens)``; ``chunks[p[0]]`` (default: ones) says how many tokens each
    step delivers to it. Each ``step()`` advances time by the next of ``durations`` (cycled) through ``advance``.
    ``variant``: a step with several requests changes the token of requests whose prompt id is odd (a planted
    batch-variance bug). Prompts starting with ``ERROR_ID`` make ``add_request`` raise."""

    def __init__(self, advance, durations=(1.0,), chunks=None, variant=False, max_model_len=4096) -> None:
        self.advance, self.durations, self.chunks, self.variant = advance, list(durations), chunks or {}, variant
        self.max_model_len = max_model_len
        self.active: dict[int, dict] = {}
        self.next_id = 0
        self.steps = 0
        self.added: list[list[int]] = []
        self.queries = self.hits = 0

    def add_request(self, prompt_ids, params, speculative=None) -> int:
        if prompt_ids[0] == ERROR_ID:
            raise ValueError("planted add_request failure")
        rid, self.next_id = self.next_id, self.next_id + 1
        self.added.append(list(prompt_ids))
        self.queries += 1
        self.hits += prompt_ids[0] % 2
        todo = fake_llama_server.tokens_for(prompt_ids, params.max_tokens)
        self.active[rid] = {"prompt": prompt_ids, "todo": todo, "chunks": list(self.chunks.get(prompt_ids[0], []))}
        return rid

    def abort(self, rid) -> None:
        self.active.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self.active)

    def step(self):
        self.advance(self.durations[self.steps % len(self.durations)])
        self.steps += 1
        outs = []
        crowded = len(self.active) > 1
        for rid, r in list(self.active.items()):
            n = r["chunks"].pop(0) if r["chunks"] else 1
            new, r["todo"] = r["todo"][:n], r["todo"][n:]
            if self.variant and crowded and r["prompt"][-1] % 2:
                new = [t + 1 for t in new]
            done = not r["todo"]
            outs.append(SimpleNamespace(request_id=rid, new_token_ids=new, finish_reason="length" if done else None))
            if done:
                del self.active[rid]
        return outs

    def stats(self) -> dict:
        return {"prefix_cache_hit_rate": self.hits / max(1, self.queries), "prefix_cache_hits": self.hits,
                "prefix_cache_queries": self.queries, "kv_blocks_total": 10, "kv_blocks_free": 10}


def fake_backend(engine, clock, name="vanilla"):
    return LeapLMBackend(engine, None, name, clock=clock)


# --------------------------------------------------------------------------- the loop and its metrics


def test_percentile_interpolates_linearly_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)


def test_closed_loop_exact_ttft_itl_and_tokens_per_s():
    # C=2, three prompts of 3 tokens; step durations 1, .5, 2, .25. Timeline:
    #  t=0 submit A, B | t=1 A+1, B+1 | t=1.5 A+2 (done), B+1; C submitted | t=3.5 B+1 (done), C+2 | t=3.75 C+1 (done)
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt), durations=(1.0, 0.5, 2.0, 0.25),
                     chunks={10: [1, 2], 20: [1, 1, 1], 30: [2, 1]})
    params = SamplingParams(temperature=0.0, max_tokens=3)
    result = run_closed_loop(fake_backend(eng, clock), [[10], [20], [30]], 2, params, clock=clock)
    ttft = [r.deliveries[0][0] - r.submitted for r in result.records]
    assert ttft == [1.0, 1.0, 2.0]
    assert [r.submitted for r in result.records] == [0.0, 0.0, 1.5]
    # gaps: A one delivery of 2 after .5 -> .25, .25; B .5, 2.0; C one of 1 after .25 -> .25
    assert sorted(itl_gaps(result.records)) == [0.25, 0.25, 0.25, 0.5, 2.0]
    m = run_metrics(result)
    assert m["wall_s"] == 3.75 and m["output_tokens"] == 9
    assert m["output_tokens_per_s"] == pytest.approx(9 / 3.75)
    assert m["ttft_p50_s"] == 1.0 and m["ttft_p99_s"] == pytest.approx(1.98)
    assert m["itl_p50_s"] == 0.25 and m["itl_p99_s"] == pytest.approx(0.5 + 1.5 * 0.96)
    assert m["errors"] == 0 and m["completed"] == 3 and m["max_in_flight"] == 2
    assert [r.token_ids for r in result.records] == [fake_llama_server.tokens_for([p], 3) for p in (10, 20, 30)]


class CountingBackend(LeapLMBackend):
    """Checks at every submit that fewer than C requests are in flight and logs (time, event)."""

    def __init__(self, engine, clock, concurrency) -> None:
        super().__init__(engine, None, "counting", clock=clock)
        self.c, self.log = concurrency, []

    def submit(self, prompt_ids, params):
        assert len(self.live) < self.c, "a request was submitted while C were in flight"
        self.log.append((self.clock(), "submit"))
        return super().submit(prompt_ids, params)

    def poll(self, timeout):
        events = super().poll(timeout)
        self.log += [(e.t, "finish") for e in events if e.finished]
        return events


@pytest.mark.parametrize("c", [1, 3, 4])
def test_never_more_than_c_in_flight_and_next_starts_when_one_finishes(c):
    clock = FakeClock()
    # lengths vary with the prompt so requests finish at different steps
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt), durations=(1.0, 0.3, 0.7))
    prompts = [[p] for p in range(10, 21)]
    backend = CountingBackend(eng, clock, c)
    params = SamplingParams(temperature=0.0, max_tokens=5)
    eng.chunks = {p[0]: [1] * (p[0] % 4) + [5] for p in prompts}   # 1..4 steps each
    result = run_closed_loop(backend, prompts, c, params, clock=clock)
    assert result.max_in_flight == min(c, len(prompts))
    assert all(r.ok for r in result.records) and len(result.records) == len(prompts)
    assert eng.added == prompts                                      # same prompts, same order
    submits = [t for t, kind in backend.log if kind == "submit"]
    finishes = [t for t, kind in backend.log if kind == "finish"]
    assert submits[:c] == [0.0] * c
    for t in submits[c:]:                                           # each later start is at some finish's time
        assert t in finishes
    in_flight, peak = 0, 0                                          # and refills to C at once
    for t, kind in backend.log:
        in_flight += 1 if kind == "submit" else -1
        peak = max(peak, in_flight)
    assert in_flight == 0 and peak == c


def test_exact_match_counts_requests_equal_to_their_alone_output():
    recs = [RequestRecord(0, 1, 0.0, token_ids=[1, 2], finished=1.0), RequestRecord(1, 1, 0.0, token_ids=[3],
            finished=1.0), RequestRecord(2, 1, 0.0, token_ids=[5, 6], finished=1.0),
            RequestRecord(3, 1, 0.0, token_ids=[], finished=1.0, error="boom")]
    ref = {0: [1, 2], 1: [3, 4], 2: [5, 6], 3: [7]}
    assert exact_match(recs, ref) == (2 / 3, 3)         # a prefix is not a match; the failed one is not compared
    assert exact_match(recs, {5: [1]}) == (None, 0)
    assert exact_match(recs, None) == (None, 0)


def test_sweep_measures_exact_match_against_the_concurrency_1_run():
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt), variant=True)
    backend = fake_backend(eng, clock)
    prompts = [[p] for p in (10, 11, 12, 13, 14, 15)]
    rows = run_sweep(Sweep("vanilla", "method", lambda c: backend), prompts, [1, 2], lambda c: 2 * c, GREEDY,
                     warmup=0, clock=clock)
    one, two = rows
    assert one["requests"] == 4 and two["requests"] == 4     # the C=1 run covers the largest level's prompts
    assert one["exact_match_vs_alone"] == 1.0 and one["exact_match_compared"] == 4
    # at C=2 the two odd prompts (11, 13) shared steps and got other tokens
    assert two["exact_match_vs_alone"] == 0.5 and two["exact_match_compared"] == 4
    assert two["prefix_cache_hit_rate"] == 0.5               # this run's counter deltas: 11, 13 of 10..13


def test_sweep_without_level_1_has_no_exact_match_and_warmup_is_untimed():
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt))
    rows = run_sweep(Sweep("vanilla", "method", lambda c: fake_backend(eng, clock)), [[10], [20], [30]], [2],
                     lambda c: 2, GREEDY, warmup=1, clock=clock)
    assert rows[0]["exact_match_vs_alone"] is None
    assert eng.added == [[10], [10], [20]]                    # warm-up on the first prompt, then the timed two
    assert rows[0]["wall_s"] == 4.0                           # 4 one-token steps of 1 s; the warm-up not counted


def test_one_failing_request_is_one_error_and_the_rest_complete():
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt))
    prompts = [[10], [ERROR_ID], [20], [30], [40]]
    rows = run_sweep(Sweep("vanilla", "method", lambda c: fake_backend(eng, clock)), prompts, [2], lambda c: 5,
                     GREEDY, warmup=0, clock=clock)
    row = rows[0]
    assert row["errors"] == 1 and row["completed"] == 4 and row["status"] == "ok"
    assert row["output_tokens"] == 16
    assert row["error_messages"] == ["ValueError: planted add_request failure"]
    assert row["max_in_flight"] == 2


def test_a_poll_that_raises_fails_the_requests_in_flight_only():
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt))
    original, calls = eng.step, []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine crashed")
        return original()

    eng.step = step
    result = run_closed_loop(fake_backend(eng, clock), [[10], [20], [30], [40]], 2, GREEDY, clock=clock)
    assert [r.error is not None for r in result.records] == [True, True, False, False]
    assert result.records[0].error == "poll failed: RuntimeError: engine crashed"


def test_a_stuck_request_times_out_as_an_error():
    clock = FakeClock()

    class Stuck(LeapLMBackend):
        def poll(self, timeout):
            clock.t += 10.0
            return []

    eng = FakeEngine(lambda dt: None)
    result = run_closed_loop(Stuck(eng, None, "stuck", clock=clock), [[10]], 1, GREEDY, clock=clock,
                             request_timeout=25.0)
    assert result.records[0].error == "timed out after 25 s"
    assert not eng.active                                    # aborted in the engine


def test_leaplm_backend_names_a_missing_engine_api():
    with pytest.raises(BenchError, match="add_request"):
        LeapLMBackend(SimpleNamespace(step=lambda: []), None)


def test_row_schema_is_the_same_for_runs_and_skipped_rows():
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt))
    row = run_sweep(Sweep("vanilla", "method", lambda c: fake_backend(eng, clock)), [[10]], [1], lambda c: 1,
                    GREEDY, warmup=0, clock=clock)[0]
    base = {"method", "kind", "concurrency", "status", *ROW_METRICS, "error_messages", "info"}
    assert set(row) == base | {"engine_stats"}
    assert set(serving.empty_row("x", "peer", 4, "skipped: y")) == base
    failed = run_sweep(Sweep("broken", "peer", lambda c: (_ for _ in ()).throw(OSError("no binary"))), [[10]], [1, 4],
                       lambda c: 1, GREEDY)
    assert [(r["concurrency"], r["status"]) for r in failed] == [(1, "failed: OSError: no binary"),
                                                                  (4, "failed: OSError: no binary")]


def test_parsers():
    assert parse_concurrency("16, 1,4,4") == [1, 4, 16]
    for bad in ("0", "a", ""):
        with pytest.raises(BenchError, match="--concurrency"):
            parse_concurrency(bad)
    assert parse_serving_methods("prompt_lookup,recycling:num_draft=8") == [
        ("vanilla", None), ("prompt_lookup", "prompt_lookup"), ("recycling:num_draft=8", {"method": "recycling",
                                                                                          "num_draft": 8})]
    assert parse_serving_methods("draft", "/m/d.gguf")[1] == ("draft", {"method": "draft", "model": "/m/d.gguf"})
    with pytest.raises(BenchError, match="--draft-model"):
        parse_serving_methods("draft")
    with pytest.raises(BenchError, match="unknown serving peer"):
        serving.parse_serving_peers("llamacpp")
    assert serving.requests_for(4, None, 100) == 8 and serving.requests_for(64, None, 100) == 100
    assert serving.requests_for(4, 3, 100) == 3


# --------------------------------------------------------------------------- llama-server client and process


@pytest.fixture
def fake_server():
    server, thread = fake_llama_server.serve()
    yield server
    server.shutdown()
    server.server_close()


def test_llama_server_client_parses_the_stream_and_sends_greedy_token_requests(fake_server):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    backend = LlamaServerBackend(url, stop_ids=[999])
    prompts = [[5, 6], [ERROR_ID, 1], [7], [995], [100]]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    result = run_closed_loop(backend, prompts, 2, params)
    backend.close()
    recs = result.records
    assert recs[0].token_ids == [7, 8, 9, 10, 11, 12] and recs[0].finish_reason == "length"
    assert len(recs[0].deliveries) == 6                     # one delivery per streamed event
    assert recs[1].error.startswith("HTTP 500: planted failure")
    assert recs[2].token_ids == fake_llama_server.tokens_for([7], 6)
    assert recs[3].token_ids == [996, 997, 998, 999] and recs[3].finish_reason == "stop"   # client-side EOS cut
    assert recs[4].ok
    body = next(b for b in fake_server.bodies if b["prompt"] == [5, 6])
    assert body == {"prompt": [5, 6], "n_predict": 6, "stream": True, "temperature": 0.0, "top_k": 1,
                    "cache_prompt": False, "return_tokens": True, "seed": 0}
    m = run_metrics(result)
    assert m["errors"] == 1 and m["completed"] == 4 and m["max_in_flight"] == 2


def test_llama_server_client_reports_a_dead_server_as_errors():
    backend = LlamaServerBackend(f"http://127.0.0.1:{serving_free_port()}")
    result = run_closed_loop(backend, [[1], [2]], 2, GREEDY, request_timeout=30)
    assert [r.error is not None for r in result.records] == [True, True]
    assert "ConnectionRefusedError" in result.records[0].error


def serving_free_port() -> int:
    from leaplm.bench.serving_peers import free_port

    return free_port()


def fake_binary(tmp_path: Path) -> Path:
    exe = tmp_path / "llama-server"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_llama_server.py'} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_llama_server_process_starts_waits_for_health_and_stops(tmp_path):
    log = tmp_path / "server.log"
    proc = LlamaServerProcess(fake_binary(tmp_path), tmp_path / "m.gguf", parallel=4, ctx=4 * 300, threads=2,
                              log_path=log).start()
    try:
        backend = LlamaServerBackend(proc.url, pid=proc.pid)
        result = run_closed_loop(backend, [[1], [2], [3]], 2, GREEDY)
        assert all(r.ok for r in result.records)
        sampler = serving.RssSampler(proc.pid).start()
        assert sampler.stop() > 0
    finally:
        proc.stop()
    assert proc.proc.poll() is not None
    args = log.read_text()
    assert "--parallel 4 --cont-batching -c 1200 -t 2 -tb 2" in args and f"-m {tmp_path / 'm.gguf'}" in args


def test_llama_server_process_that_exits_is_reported_with_its_log(tmp_path):
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\necho 'error: unknown argument --cont-batching'\nexit 3\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(BenchError, match="exited with code 3 while starting: error: unknown argument"):
        LlamaServerProcess(exe, tmp_path / "m.gguf", 1, 100, 1).start()


def test_find_llama_server_prefers_the_newest_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_llama_server() is None
    for v in ("0.3.9", "0.3.36"):
        (tmp_path / "llama-server" / v).mkdir(parents=True)
        fake_binary(tmp_path / "llama-server" / v)
    assert find_llama_server() == tmp_path / "llama-server" / "0.3.36" / "llama-server"
    with pytest.raises(BenchError, match="not an executable"):
        find_llama_server(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- the whole command, faked


class FakeLLM:
    """What ``run_serving`` uses of ``leaplm.LLM``: a tokenizer without chat template, and a FakeEngine."""

    def __init__(self, model, **kwargs) -> None:
        import torch

        self.model_path, self.kwargs = model, kwargs
        self.tokenizer = SimpleNamespace(eos_token_ids={999}, hf=SimpleNamespace(chat_template=None),
                                         encode=lambda text: [ord(c) % 500 for c in text], decode=lambda ids: "")
        self.engine = FakeEngine(lambda dt: time.sleep(0.001))
        self.model = SimpleNamespace(config=SimpleNamespace(family="fake"))
        self.device, self.dtype, self.quantization = torch.device("cpu"), torch.float32, None


def test_command_writes_results_report_and_requests(tmp_path, monkeypatch, capsys):
    import leaplm.llm
    from leaplm.bench import cli

    monkeypatch.setattr(leaplm.llm, "LLM", FakeLLM)
    monkeypatch.setenv("LEAPLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    (tmp_path / "bin").mkdir()
    fake_binary(tmp_path / "bin")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    work = tmp_path / "w.jsonl"
    work.write_text("".join(json.dumps({"prompt_ids": [p, p + 1], "category": c}) + "\n"
                            for p, c in [(10, "a"), (20, "a"), (30, "b"), (40, "b"), (50, "c")]))
    out = tmp_path / "out"
    rc = cli.run(["--concurrency", "2,1", "--requests", "3", "--max-tokens", "4", "--workload", str(work),
                  "--model", str(model), "--peers", "llamacpp-server,hf-serve", "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["concurrency"]): r for r in results["rows"]}
    assert list(rows) == [("vanilla", 1), ("vanilla", 2), ("llamacpp-server", 1), ("llamacpp-server", 2),
                          ("hf-serve", 1), ("hf-serve", 2)]
    for key in [("vanilla", 1), ("vanilla", 2), ("llamacpp-server", 1), ("llamacpp-server", 2)]:
        r = rows[key]
        assert r["status"] == "ok" and r["errors"] == 0 and r["requests"] == 3, r
        assert r["exact_match_vs_alone"] == 1.0 and r["output_tokens"] == 12
        assert r["output_tokens_per_s"] > 0 and r["ttft_p50_s"] > 0 and r["peak_rss_mb"] > 0
    assert rows[("vanilla", 1)]["prefix_cache_hit_rate"] is not None
    assert rows[("llamacpp-server", 2)]["prefix_cache_hit_rate"] is None
    assert rows[("llamacpp-server", 2)]["info"]["version"] == "version: 1 (fake) built with test"
    assert rows[("hf-serve", 1)]["status"].startswith("failed: ")   # a 4-byte "GGUF" does not load
    assert rc == 1                                                    # a failed row -> exit status 1
    assert results["schema"] == serving.SCHEMA and results["concurrency"] == [1, 2]
    assert {"cpu", "cores", "torch", "transformers", "git_commit"} <= set(results["machine"])
    assert results["workload"]["prompt_ids"] == ["a/0", "b/2", "c/4"]   # categories interleaved
    assert "_records" not in results
    report = (out / "report.md").read_text()
    assert "| llamacpp-server | 2 | 3 |" in report and "| backend | C |" in report
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 3 + 0 and json.loads(lines[0])["token_ids"] == [12, 13, 14, 15]
    printed = capsys.readouterr().out
    assert "llamacpp-server" in printed and "closed loop" in printed


def test_command_refuses_sampling(tmp_path):
    from leaplm.bench import cli

    rc = cli.run(["--concurrency", "1", "--workload", "builtin", "--temperature", "0.7", "--out", str(tmp_path)])
    assert rc == 2


# --------------------------------------------------------------------------- transformers' continuous batching


def test_hf_serve_backend_streams_greedy_tokens_equal_to_generate():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from leaplm.bench.serving_peers import HFServeBackend

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompts = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6], [1, 8, 8]]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    backend = HFServeBackend(model, [95], concurrency=2, max_tokens=6, longest_prompt=6)
    try:
        result = run_closed_loop(backend, prompts, 2, params, request_timeout=120)
    finally:
        backend.close()
    with torch.inference_mode():
        for p, rec in zip(prompts, result.records):
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 eos_token_id=95, pad_token_id=95)
            assert rec.ok and rec.token_ids == out[0, len(p):].tolist()
            assert len(rec.deliveries) >= 2                   # streamed, not one final delivery
    assert result.max_in_flight == 2


# --------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
@pytest.mark.real
def test_real_smollm2_engine_and_llama_server(tmp_path):
    from leaplm import hub
    from leaplm.bench import cli

    if not hasattr(__import__("leaplm.engine", fromlist=["x"]), "LLMEngine"):
        pytest.skip("leaplm.engine has no LLMEngine yet")
    try:
        hub.resolve(hub.DEFAULT_MODEL, download=False)
    except Exception:  # noqa: BLE001
        pytest.skip("SmolLM2 is not downloaded")
    peers = ["--peers", "llamacpp-server"] if find_llama_server() else []
    rc = cli.run(["--concurrency", "1,3", "--requests", "3", "--max-tokens", "12", "--workload", "builtin",
                  "--methods", "prompt_lookup", *peers, "--out", str(tmp_path), "--no-progress"])
    results = json.loads((tmp_path / "results.json").read_text())
    for row in results["rows"]:
        assert row["status"] == "ok" and row["errors"] == 0, row
        assert row["exact_match_vs_alone"] == 1.0, row
        assert 0 <= row["prefix_cache_hit_rate"] <= 1 if row["kind"] == "method" else row["prefix_cache_hit_rate"] is None
        assert math.isfinite(row["output_tokens_per_s"])
    assert rc == 0


def test_a_long_prompt_injected_mid_run_is_extra_and_measured_apart():
    clock = FakeClock()
    eng = FakeEngine(lambda dt: setattr(clock, "t", clock.t + dt))
    prompts = [[p] for p in range(10, 18)]
    params = SamplingParams(temperature=0.0, max_tokens=3)
    result = run_closed_loop(fake_backend(eng, clock), prompts, 2, params, clock=clock, inject=(4, [40] * 50))
    assert [r.index for r in result.records] == list(range(8)) and all(r.ok for r in result.records)
    assert result.extra is not None and result.extra.ok and result.extra.prompt_tokens == 50
    assert eng.added.index([40] * 50) == 4                    # arrived right after the 4th submission
    assert result.max_in_flight == 3                          # on top of the C=2 in flight, not in place of one
    m = run_metrics(result)
    assert m["requests"] == 8 and m["long_prompt_tokens"] == 50
    assert m["long_prompt_ttft_s"] == result.extra.deliveries[0][0] - result.extra.submitted
    rows = run_sweep(Sweep("vanilla", "method", lambda c: fake_backend(eng, clock)), prompts, [1, 2],
                     lambda c: 4, params, warmup=0, clock=clock, long_prompt=[40] * 50)
    assert [(r["method"], r["concurrency"]) for r in rows] == [("vanilla", 1), ("vanilla", 2), ("vanilla +long", 2)]
    assert rows[2]["itl_p99_growth_s"] == pytest.approx(rows[2]["itl_p99_s"] - rows[1]["itl_p99_s"])
    assert rows[1]["long_prompt_tokens"] is None and rows[2]["exact_match_vs_alone"] == 1.0
