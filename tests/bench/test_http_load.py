"""``leaplm bench-serve``: the HTTP load client (``http_load``), the servers it starts (``serve_targets``) and the
command (``serve_load_cli``), against ``fake_openai_server`` - no real model needed."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaplm.bench import BenchError
from leaplm.bench import http_load as hl
from leaplm.bench.http_load import HttpRecord, LevelResult
from leaplm.bench.serving import RssSampler

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import fake_openai_server  # noqa: E402


def msg(**script) -> list[dict]:
    return [{"role": "user", "content": json.dumps(script)}]


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def fake():
    server, thread = fake_openai_server.serve()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- loopback


@pytest.mark.parametrize("url, base", [("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
                                       ("http://localhost:8000/v1/", "http://localhost:8000"),
                                       ("http://[::1]:9/", "http://[::1]:9"), ("https://127.5.0.1:1", "https://127.5.0.1:1")])
def test_loopback_urls_are_accepted_as_their_base(url, base):
    assert hl.check_loopback(url) == base


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com:80", "http://192.168.1.5",
                                 "http://127.0.0.1.example.com:80", "http://[2001:db8::1]:80"])
def test_non_loopback_urls_are_refused_before_anything_is_sent(url):
    with pytest.raises(BenchError, match="not this machine.*loopback"):
        hl.check_loopback(url)
    with pytest.raises(BenchError, match="loopback"):
        hl.run_level_sync(url, [msg()], 1, 1)


def test_a_url_without_http_is_refused():
    with pytest.raises(BenchError, match="http://"):
        hl.check_loopback("ftp://127.0.0.1:21")


# --------------------------------------------------------------------------- metrics on a known timing script


def record(i: int, submitted: float, chunks: list[tuple[float, str]], completion: int | None = None,
           finish: str | None = "stop", error: str | None = None) -> HttpRecord:
    r = HttpRecord(i, i, submitted, chunks=list(chunks), finished=chunks[-1][0] if chunks else submitted + 1,
                   finish_reason=finish, error=error)
    r.usage = {"completion_tokens": completion} if completion is not None else None
    return r


def test_metrics_of_a_known_timing_script_are_exact():
    recs = [
        record(0, 0.0, [(1.0, "a "), (1.5, "b "), (2.0, "c ")], completion=3),     # ttft 1.0, gaps .5 .5
        record(1, 1.0, [(3.0, "d "), (4.2, "e f g ")], completion=4),             # ttft 2.0, gaps .4 .4 .4
        record(2, 2.0, [(2.5, "h "), (2.6, "i ")], completion=3),                  # +EOS without text: 1 a chunk
        record(3, 2.0, [(2.1, "x ")], completion=1, error="HTTP 500: boom"),      # an error: not in the metrics
        record(4, 2.0, [(2.2, "y "), (2.3, "z ")], completion=2, finish=None),     # truncated: no finish_reason
    ]
    hl.count_tokens(recs, words)
    assert [r.deliveries for r in recs[:3]] == [[(1.0, 1), (1.5, 1), (2.0, 1)], [(3.0, 1), (4.2, 3)],
                                                [(2.5, 1), (2.6, 1)]]
    m = hl.level_metrics(LevelResult(recs, 6, 2, 4.0, 2, False))
    assert (m["requests"], m["submitted"], m["completed"], m["errors"], m["truncated"], m["not_submitted"]) == (6, 5, 3, 1, 1, 1)
    assert m["output_tokens"] == 3 + 4 + 3
    assert m["output_tokens_per_s"] == pytest.approx(10 / 4.0)
    assert m["requests_per_s"] == pytest.approx(3 / 4.0)
    ttft = sorted([1.0, 2.0, 0.5])
    assert m["ttft_p50_s"] == pytest.approx(1.0)
    assert m["ttft_p99_s"] == pytest.approx(ttft[1] + (ttft[2] - ttft[1]) * 0.98)
    gaps = sorted([0.5, 0.5, 0.4, 0.4, 0.4, 0.1])
    assert m["itl_p50_s"] == pytest.approx((gaps[2] + gaps[3]) / 2)
    assert m["itl_p99_s"] == pytest.approx(gaps[4] + (gaps[5] - gaps[4]) * 0.95)


def test_tokens_per_chunk_rule():
    assert hl.tokens_per_chunk(["a ", "b "], 2, words) == [1, 1]
    assert hl.tokens_per_chunk(["a ", "b "], 3, words) == [1, 1]            # an end token without text
    assert hl.tokens_per_chunk(["a b ", "c "], 3, words) == [1, 1]          # taken as one a chunk + an end token
    assert hl.tokens_per_chunk(["a b ", "c ", "d e f "], 6, words) == [2, 1, 3]
    assert hl.tokens_per_chunk(["a b ", "c "], 6, None) == [1, 1]           # nothing to count with: 1 each
    assert hl.tokens_per_chunk(["a b ", ""], 4, words) == [2, 1]            # at least one a chunk


def test_output_tokens_come_from_usage_else_the_tokenizer_else_the_chunks():
    a = record(0, 0.0, [(1.0, "a b c ")], completion=7)
    b = record(1, 0.0, [(1.0, "a b c ")], finish=None)
    c = record(2, 0.0, [(1.0, "a b c "), (1.1, "d")], finish=None)
    hl.count_tokens([a, b], words)
    hl.count_tokens([c], None)
    assert (a.output_tokens, a.counted_by) == (7, "usage")
    assert (b.output_tokens, b.counted_by) == (3, "tokenizer")
    assert (c.output_tokens, c.counted_by) == (2, "chunks")


def test_rss_summary_reads_start_mark_end_and_peak():
    mb = 2**20
    series = [(0.0, 100 * mb), (1.0, 110 * mb), (2.0, 150 * mb), (3.0, 120 * mb), (4.0, 126 * mb), (5.0, 400 * mb)]
    s = hl.rss_summary(series, t0=1.5, t_mark=2.5, t1=4.0)
    assert s == {"rss_start_mb": 110, "rss_after_100_mb": 120, "rss_end_mb": 126, "rss_peak_mb": 150,
                 "rss_end_over_after_100": pytest.approx(126 / 120)}
    assert hl.rss_summary(series, 1.5, None, 4.0)["rss_after_100_mb"] is None
    assert hl.rss_summary([], 0, 1, 2) == dict.fromkeys(hl.RSS_FIELDS)


def test_rss_sampler_tree_counts_the_children_and_keeps_a_series():
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'x = bytearray(80_000_000); import time; time.sleep(60)']); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        time.sleep(1.5)
        alone = RssSampler(proc.pid).sample()
        tree = RssSampler(proc.pid, 0.05, tree=True, keep_series=True).start()
        time.sleep(0.3)
        tree.stop()
        assert len(tree.series) >= 3 and all(t1 >= t0 for (t0, _), (t1, _) in zip(tree.series, tree.series[1:]))
        assert tree.series[-1][1] - alone > 70_000_000
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


# --------------------------------------------------------------------------- against the fake server


def test_measured_ttft_and_itl_follow_the_servers_timing(fake):
    script = msg(first=0.3, gap=0.1, tokens=4, role_chunk=True)
    r = hl.run_level_sync(fake.url, [script], 2, 4, max_tokens=16, model="fake-model")
    hl.count_tokens(r.records, words)
    m = hl.level_metrics(r)
    assert (m["completed"], m["errors"], m["truncated"], m["output_tokens"]) == (4, 0, 0, 16)
    assert 0.3 <= m["ttft_p50_s"] < 0.3 + 0.25           # the role-only chunk is not a first token
    assert 0.1 <= m["itl_p50_s"] < 0.1 + 0.1
    assert m["max_in_flight"] == 2 and fake.max_active == 2
    assert all(rec.leaplm == {"tokens_per_s": 1.0} and rec.done for rec in r.records)
    body = fake.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_tokens"], body["model"]) == (0.0, 16, "fake-model")


def test_multi_token_chunks_count_as_that_many_gaps(fake):
    r = hl.run_level_sync(fake.url, [msg(tokens=6, per_chunk=3, gap=0.3)], 1, 1)
    hl.count_tokens(r.records, words)
    (rec,) = r.records
    assert [k for _, k in rec.deliveries] == [3, 3]
    m = hl.level_metrics(r)
    assert 0.1 <= m["itl_p50_s"] < 0.2 and m["itl_p50_s"] == pytest.approx(m["itl_p99_s"])


def test_errors_and_truncated_responses_are_counted(fake):
    prompts = [msg(), msg(mode="http500"), msg(mode="sse_error"), msg(mode="no_finish"), msg(mode="no_usage"),
               msg(mode="hang", hang=3)]
    r = hl.run_level_sync(fake.url, prompts, 3, 6, request_timeout=0.5)
    hl.count_tokens(r.records, words)
    m = hl.level_metrics(r)
    assert (m["completed"], m["errors"], m["truncated"]) == (1, 3, 2)
    errors = {rec.prompt: rec.error for rec in r.records}
    assert errors[1] == "HTTP 500: planted failure"
    assert errors[2] == "SSE error: planted stream failure"
    assert errors[5] == "timed out after 0.5 s"
    assert errors[0] is None and errors[3] is None and errors[4] is None
    assert [rec.prompt for rec in r.records if rec.truncated] == [3, 4]


def test_closed_loop_keeps_c_in_flight_and_cycles_the_prompts(fake):
    prompts = [msg(first=0.05, tokens=1), msg(first=0.05, tokens=2)]
    r = hl.run_level_sync(fake.url, prompts, 3, 9)
    assert [rec.index for rec in r.records] == list(range(9))
    assert [rec.prompt for rec in r.records] == [0, 1] * 4 + [0]
    assert r.max_in_flight == 3 and fake.max_active == 3
    assert all(rec.ok for rec in r.records)


def test_the_level_time_bound_stops_sending_and_cancels_what_runs(fake):
    r = hl.run_level_sync(fake.url, [msg(first=0.4, tokens=1)], 2, 50, level_timeout=1.0)
    m = hl.level_metrics(r)
    assert r.hit_time_bound and m["hit_time_bound"]
    assert m["not_submitted"] > 0 and m["submitted"] + m["not_submitted"] == 50
    assert m["completed"] >= 2
    assert all(rec.error is None or "time bound" in rec.error for rec in r.records)


def test_a_server_that_is_not_there_is_an_error_per_request():
    from leaplm.bench.serving_peers import free_port

    r = hl.run_level_sync(f"http://127.0.0.1:{free_port()}", [msg()], 2, 3)
    assert len(r.records) == 3 and all(rec.error and "Connect" in rec.error for rec in r.records)


# --------------------------------------------------------------------------- servers started by the tool


def fake_binary(tmp_path: Path, name: str = "fake-server") -> Path:
    exe = tmp_path / name
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_openai_server.py'} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_a_command_server_waits_for_its_ready_line(tmp_path):
    from leaplm.bench.serve_targets import LEAPLM_READY, CommandServer

    exe = fake_binary(tmp_path)
    server = CommandServer("fake", [str(exe), "--port", "{port}", "--ready-after", "1.0"], ready_text=LEAPLM_READY,
                           log_path=tmp_path / "fake.log")
    t = time.monotonic()
    try:
        server.start()
        assert time.monotonic() - t >= 1.0
        assert LEAPLM_READY in (tmp_path / "fake.log").read_text()
    finally:
        server.stop()
    assert server.proc.poll() is not None


def test_plans_of_the_three_servers(tmp_path, monkeypatch):
    from leaplm.bench import serve_targets as st

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    kw = dict(model_path=gguf, max_concurrency=64, longest_prompt=100, max_tokens=28, threads=2, log_dir=tmp_path)
    leap = st.plan_server("leaplm", leaplm_args=["-q", "int8"], **kw)
    assert not leap.per_level
    assert leap.make(64).command(1234)[1:] == ["-m", "leaplm.cli", "serve", "--model", str(gguf), "--host", "127.0.0.1",
                                               "--port", "1234", "--max-num-seqs", "64", "-q", "int8"]
    llama = st.plan_server("llamacpp-server", llama_server=str(fake_binary(tmp_path)), **kw)
    assert llama.per_level
    cmd = llama.make(16).command(99)
    assert cmd[cmd.index("--parallel") + 1] == "16" and cmd[cmd.index("-c") + 1] == str(16 * (100 + 28 + 16))
    assert st.plan_server("llamacpp-server", **{**kw, "model_path": tmp_path}).startswith("skipped: ")
    hf = st.plan_server("hf-serve", **kw)
    if isinstance(hf, str):
        assert hf.startswith("skipped: ")
    else:
        cmd = hf.make(64).command(7)
        assert cmd[1:3] == ["serve", "--continuous-batching"] and cmd[-1] == f"{tmp_path}:m.gguf"
        assert hf.make(64).env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(st, "transformers_cli", lambda: None)
    assert "transformers" in st.plan_server("hf-serve", **kw)
    with pytest.raises(BenchError, match="unknown server"):
        st.parse_servers("leaplm,vllm")


# --------------------------------------------------------------------------- the command


def run_cli(argv: list[str]) -> int:
    from leaplm.bench import serve_load_cli

    return serve_load_cli.run(argv)


def workload(tmp_path: Path, scripts: list[dict]) -> Path:
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps({"prompt": json.dumps(s), "category": f"c{i % 2}"}) + "\n"
                            for i, s in enumerate(scripts)))
    return path


def test_command_against_a_url_writes_results_report_and_plots(fake, tmp_path, capsys):
    out = tmp_path / "out"
    w = workload(tmp_path, [{"first": 0.02, "gap": 0.01, "tokens": 3}] * 4)
    code = run_cli(["--url", fake.url + "/v1", "--server-pid", str(os.getpid()), "--name", "fake", "--concurrency",
                    "2,1", "--requests", "6,5", "--workload", str(w), "--max-tokens", "8", "--no-progress",
                    "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "leaplm-bench-serve/1" and res["concurrency"] == [1, 2]
    assert res["command"][:2] == ["leaplm", "bench-serve"] and res["machine"]["cores"]
    rows = res["rows"]
    assert [(r["server"], r["concurrency"], r["status"]) for r in rows] == [("fake", 1, "ok"), ("fake", 2, "ok")]
    assert res["requests"] == {"1": 5, "2": 6}
    for r, n in zip(rows, (5, 6)):
        assert (r["completed"], r["errors"], r["truncated"], r["output_tokens"]) == (n, 0, 0, 3 * n)
        assert 0 <= r["info"]["client_cpu_s"] < 30
        assert r["output_tokens_per_s"] > 0 and r["ttft_p99_s"] >= r["ttft_p50_s"] >= 0.02
        assert r["rss_start_mb"] > 0 and r["rss_peak_mb"] >= r["rss_end_mb"] > 0 and r["rss_after_100_mb"] is None
        assert r["info"]["served_model"] == "fake-model"
        assert r["leaplm_stats"] == {"mean_tokens_per_s": 1.0}
    assert len(fake.bodies) == (1 + 5) + (1 + 6)     # a warm-up and the timed requests per level
    assert all(b["model"] == "fake-model" for b in fake.bodies)
    report = (out / "report.md").read_text()
    assert "| fake | 2 | 6/6 | 0 | 0 |" in report and "throughput.png" in report
    for name in ("throughput.png", "rss.png", "requests.jsonl", "rss_series.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 11 and lines[0]["text"] == "w0 w1 w2 " and lines[0]["counted_by"] == "usage"


def test_command_reads_the_rss_after_100_requests_and_checks_integrity(fake, tmp_path):
    out = tmp_path / "out"
    w = workload(tmp_path, [{"tokens": 1}] * 3)
    assert run_cli(["--url", fake.url, "--server-pid", str(os.getpid()), "-c", "8", "-n", "120", "-w", str(w),
                    "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (row,) = res["rows"]
    assert row["completed"] == 120 and row["rss_after_100_mb"] > 0
    assert row["rss_end_over_after_100"] == pytest.approx(row["rss_end_mb"] / row["rss_after_100_mb"])
    assert {c["check"]: c["pass"] for c in res["checks"]}["server C=8: errors + truncated + not submitted"]


def test_command_counts_errors_and_truncated_and_exits_1(fake, tmp_path):
    out = tmp_path / "out"
    w = workload(tmp_path, [{"tokens": 2}, {"mode": "http500"}, {"mode": "no_usage"}, {"tokens": 1}])
    assert run_cli(["--url", fake.url, "-c", "2", "-n", "8", "-w", str(w), "--warmup", "0", "--no-progress",
                    "--out", str(out)]) == 1
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert (row["completed"], row["errors"], row["truncated"]) == (4, 2, 2)
    assert row["error_messages"] == ["HTTP 500: planted failure"]
    assert row["rss_start_mb"] is None                   # no --server-pid: no RSS


def test_command_refuses_a_non_loopback_url(tmp_path, capsys):
    assert run_cli(["--url", "http://192.168.1.5:8000", "--out", str(tmp_path / "o")]) == 2
    assert "loopback" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_command_starts_servers_in_turn_and_says_why_one_is_skipped(tmp_path, monkeypatch):
    from leaplm.bench import serve_load_cli, serve_targets

    class FakeTokens:
        def __init__(self, model):
            self.path = tmp_path / "m.gguf"
            self.path.write_bytes(b"GGUF")

        count = staticmethod(words)

        @staticmethod
        def prompt_len(messages):
            return 10

    monkeypatch.setattr(serve_load_cli, "Tokens", FakeTokens)
    monkeypatch.setattr(serve_targets, "transformers_cli", lambda: None)
    w = workload(tmp_path, [{"tokens": 2, "first": 0.01}] * 3)
    out = tmp_path / "out"
    code = run_cli(["--servers", "llamacpp-server,hf-serve", "--model", "m", "--llama-server",
                    str(fake_binary(tmp_path)), "-c", "1,2", "-n", "4", "-w", str(w), "--no-progress", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["server"], r["concurrency"]) for r in rows] == [("llamacpp-server", 1), ("llamacpp-server", 2),
                                                               ("hf-serve", 1), ("hf-serve", 2)]
    llama = rows[:2]
    assert all(r["status"] == "ok" and r["completed"] == 4 and r["rss_peak_mb"] > 0 for r in llama)
    assert llama[0]["info"]["pid"] != llama[1]["info"]["pid"]          # restarted per level (--parallel C)
    assert "--parallel 2" in (out / "llama-server-c2.log").read_text()
    assert all(r["status"].startswith("skipped: ") and "transformers" in r["status"] for r in rows[2:])
    assert "skipped: " in (out / "report.md").read_text()


def test_requests_per_level():
    from leaplm.bench.serve_load_cli import level_requests

    assert level_requests("1,16,64", "10") == {1: 10, 16: 10, 64: 10}
    assert level_requests("64,1,16", "1000,32,320") == {1: 32, 16: 320, 64: 1000}
    for bad in ("10,20", "0", "x", "1,2,3,4"):
        with pytest.raises(BenchError, match="--requests"):
            level_requests("1,16,64", bad)


def test_each_level_gets_prompts_no_lower_level_used():
    """A server kept running across levels (leaplm serve) must not find a lower level's prompts in its prefix
    cache: level C starts past every prompt the lower levels sent."""
    from leaplm.bench.serve_load_cli import level_prompts

    prompts = list(range(100))
    levels = {1: 16, 16: 64, 64: 128}
    assert level_prompts(prompts, levels, 1)[:3] == [0, 1, 2]
    assert level_prompts(prompts, levels, 16)[:64] == list(range(16, 80))
    assert level_prompts(prompts, levels, 64)[0] == 80 and len(level_prompts(prompts, levels, 64)) == 100
    used_before = set(range(80))
    assert not used_before & set(level_prompts(prompts, levels, 64)[:20])


def test_checks_compare_leaplm_with_llama_server():
    from leaplm.bench.serve_load_cli import checks

    def row(server, c, tps, ttft, submitted=100, growth=1.01):
        return {"server": server, "concurrency": c, "status": "ok", "output_tokens_per_s": tps, "ttft_p99_s": ttft,
                "submitted": submitted, "errors": 0, "truncated": 0, "not_submitted": 0,
                "rss_end_over_after_100": growth}

    out = {c["check"]: c for c in checks([row("leaplm", 16, 130.0, 0.5), row("llamacpp-server", 16, 100.0, 0.4),
                                          row("leaplm", 64, 200.0, 1.0, 1000, 1.06)])}
    assert out["leaplm tok/s / llamacpp-server tok/s at C=16"]["value"] == pytest.approx(1.3)
    assert out["leaplm tok/s / llamacpp-server tok/s at C=16"]["pass"]
    assert not out["leaplm TTFT p99 <= llamacpp-server's at C=16"]["pass"]
    assert not out["leaplm C=64: RSS at the end / after 100 requests"]["pass"]
    assert out["leaplm C=64: errors + truncated + not submitted"]["pass"]
    slow = checks([row("leaplm", 16, 110.0, 0.3), row("llamacpp-server", 16, 100.0, 0.4)])
    assert [c["pass"] for c in slow[:2]] == [False, True]      # tok/s ratio 1.1 < 1.2; TTFT p99 under
