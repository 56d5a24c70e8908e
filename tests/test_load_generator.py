"""The load generator (bench/load.py) against a running stack: what it reports matches what it sent."""

from __future__ import annotations

import json

import bench.common
from bench import load


def run(monkeypatch, tmp_path, *args: str) -> dict:
    monkeypatch.setattr(bench.common, "OUT", tmp_path)
    assert load.main(["--warmup", "0", "--name", "test", *args]) == 0
    return json.loads((tmp_path / "load-test.json").read_text())


def test_closed_loop_with_repeated_images_reports_counts_latencies_and_hits(stack, monkeypatch, tmp_path):
    results = run(monkeypatch, tmp_path, "--gateway", stack.gateway, "--requests", "10", "--concurrency", "1",
                  "--images", "1", "--image-sizes", "32x32,48x32", "--repeat", "0.5", "--max-tokens", "3-5",
                  "--temperature", "0")
    assert (results["requests"], results["ok"], results["errors"]) == (10, 10, {})
    assert 10 <= round(results["tokens_per_s"] * results["wall_s"]) <= 50   # 3-5 tokens each, fewer at an EOS
    assert results["images_per_s"] == results["requests_per_s"]             # one image per request
    # One caller: a repeated image was encoded by an earlier, finished request, so it is a hit.
    assert 0 < results["cache_hit_ratio"] < 1
    assert results["ttft_p50_ms"] <= results["ttft_p99_ms"] and results["tpot_p50_ms"] > 0


def test_open_loop_counts_every_arrival(stack, monkeypatch, tmp_path):
    results = run(monkeypatch, tmp_path, "--gateway", stack.gateway, "--rate", "20", "--duration", "1",
                  "--concurrency", "4", "--max-tokens", "2")
    assert results["requests"] + results["client_dropped"] >= 5
    assert results["ok"] == results["requests"] and results["errors"] == {}
