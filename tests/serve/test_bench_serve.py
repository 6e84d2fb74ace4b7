"""``leaplm bench-serve`` against a real ``leaplm serve`` (the ``server`` fixture): a short closed-loop load."""
from __future__ import annotations

import json

import pytest

from leaplm.bench import serve_load_cli


@pytest.mark.real
def test_bench_serve_loads_leaplm_serve_without_errors(server, smollm_gguf, tmp_path):
    out = tmp_path / "out"
    code = serve_load_cli.run(["--url", server.url, "--server-pid", str(server.proc.pid), "--name", "leaplm",
                               "--model", str(smollm_gguf), "-c", "4", "-n", "8", "--max-tokens", "32",
                               "-w", "builtin", "--no-progress", "--out", str(out)])
    assert code == 0, server.log()[-3000:]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert (row["status"], row["completed"], row["errors"], row["truncated"]) == ("ok", 8, 0, 0)
    assert row["info"]["output_tokens_counted_by"]["usage"] == 8      # every stream ended with usage
    assert 0 < row["output_tokens"] <= 8 * 32 and row["output_tokens_per_s"] > 0
    assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["itl_p50_s"] > 0
    assert row["max_in_flight"] == 4
    assert row["rss_start_mb"] > 50 and row["rss_peak_mb"] >= row["rss_end_mb"]
    assert row["leaplm_stats"]["mean_ttft_s"] > 0                     # the server's own stats chunk field
    requests = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert all(r["finish_reason"] in ("stop", "length") and r["text"] for r in requests)
