"""The goodput benchmark (bench/goodput.py): its SLO rule on made-up results, the encode wait read from a histogram,
and one short run on the tiny stack it starts."""

from __future__ import annotations

import json

import pytest

import bench.common
from bench import encode_wait, goodput, slo
from bench.slo import Slo

SLO = Slo(ttft_s=2.0, tpot_ms=50.0)


def result(ttft_p99_ms: float | None = 500.0, tpot_p99_ms: float | None = 20.0, requests: int = 100,
           ok: int | None = None, client_dropped: int = 0) -> dict:
    """The keys of bench.load_run.summarize that the SLO reads."""
    return {"requests": requests, "ok": requests if ok is None else ok, "client_dropped": client_dropped,
            "ttft_p99_ms": ttft_p99_ms, "tpot_p99_ms": tpot_p99_ms}


def test_goodput_is_the_highest_rate_meeting_the_slo():
    by_rate = {2.0: result(), 4.0: result(ttft_p99_ms=1999.0), 8.0: result(ttft_p99_ms=2001.0),
               6.0: result(tpot_p99_ms=50.0)}
    assert slo.goodput(by_rate, SLO) == 6.0   # rates in any order; the bounds themselves meet the SLO


def test_goodput_is_zero_when_no_rate_meets_the_slo():
    assert slo.goodput({1.0: result(tpot_p99_ms=51.0), 2.0: result(ttft_p99_ms=3000.0)}, SLO) == 0.0
    assert slo.goodput({}, SLO) == 0.0


def test_a_failing_rate_between_passing_ones_ends_the_goodput():
    by_rate = {2.0: result(), 4.0: result(ttft_p99_ms=2500.0), 6.0: result(), 8.0: result()}
    assert slo.goodput(by_rate, SLO) == 2.0
    assert slo.goodput({2.0: result(ttft_p99_ms=2500.0), 4.0: result()}, SLO) == 0.0


def test_unanswered_requests_fail_a_rate_beyond_the_allowed_share():
    with_errors = result(requests=100, ok=99)
    dropped = result(requests=95, client_dropped=5)
    assert not slo.meets_slo(with_errors, SLO) and not slo.meets_slo(dropped, SLO)
    # 1 of 100 arrivals unanswered, and 5 of 100: within 5%.
    assert slo.meets_slo(with_errors, Slo(2.0, 50.0, 0.05)) and slo.meets_slo(dropped, Slo(2.0, 50.0, 0.05))
    assert not slo.meets_slo(result(requests=100, ok=94), Slo(2.0, 50.0, 0.05))
    assert slo.goodput({1.0: result(), 2.0: with_errors, 4.0: result()}, SLO) == 1.0


def test_a_rate_with_no_answer_fails_and_one_token_answers_have_no_tpot_to_miss():
    assert not slo.meets_slo(result(ttft_p99_ms=None, tpot_p99_ms=None, requests=3, ok=0), SLO)
    assert not slo.meets_slo(result(requests=0), SLO)
    assert slo.meets_slo(result(tpot_p99_ms=None), SLO)


METRICS_BEFORE = """\
# TYPE pixtral_gateway_encode_wait_seconds histogram
pixtral_gateway_encode_wait_seconds_bucket{le="0.01"} 1.0
pixtral_gateway_encode_wait_seconds_bucket{le="0.1"} 1.0
pixtral_gateway_encode_wait_seconds_bucket{le="1.0"} 1.0
pixtral_gateway_encode_wait_seconds_bucket{le="+Inf"} 1.0
pixtral_gateway_encode_wait_seconds_count 1.0
pixtral_gateway_encode_wait_seconds_sum 0.005
# TYPE pixtral_gateway_time_to_first_token_seconds histogram
pixtral_gateway_time_to_first_token_seconds_bucket{le="+Inf"} 7.0
pixtral_gateway_time_to_first_token_seconds_count 7.0
pixtral_gateway_time_to_first_token_seconds_sum 1.0
"""


def test_encode_wait_is_what_the_histogram_gained_between_two_reads():
    # Since the first read: 10 waits, 5 in (0.01, 0.1], 4 in (0.1, 1], 1 above 1 s; 2.005 - 0.005 s in all.
    after = METRICS_BEFORE
    for old, new in (('le="0.1"} 1.0', 'le="0.1"} 6.0'), ('le="1.0"} 1.0', 'le="1.0"} 10.0'),
                     ('le="+Inf"} 1.0', 'le="+Inf"} 11.0'), ("count 1.0", "count 11.0"), ("sum 0.005", "sum 2.005")):
        after = after.replace(old, new)
    before = encode_wait.read_histogram(METRICS_BEFORE, encode_wait.ENCODE_WAIT)
    gained = encode_wait.read_histogram(after, encode_wait.ENCODE_WAIT)
    waits = encode_wait.encode_wait(before, gained)
    assert waits["encode_wait_count"] == 10 and waits["encode_wait_mean_ms"] == pytest.approx(200.0)
    # The 5th of 10 ranks is the last of the (0.01, 0.1] bucket; the 9.9th lies above the last finite bound.
    assert waits["encode_wait_p50_ms"] == pytest.approx(100.0)
    assert waits["encode_wait_p99_ms"] == pytest.approx(1000.0)
    # The 8th rank: 3 of the 4 waits of (0.1, 1], linear within it.
    buckets = [(0.01, 0.0), (0.1, 5.0), (1.0, 9.0), (float("inf"), 10.0)]
    assert encode_wait.histogram_quantile(0.8, buckets) == pytest.approx(0.1 + 0.9 * 3 / 4)


def test_no_encode_wait_without_observations():
    histogram = encode_wait.read_histogram(METRICS_BEFORE, encode_wait.ENCODE_WAIT)
    assert encode_wait.encode_wait(histogram, histogram) == {"encode_wait_count": 0, "encode_wait_mean_ms": None,
                                                         "encode_wait_p50_ms": None, "encode_wait_p99_ms": None}
    assert encode_wait.histogram_quantile(0.5, [(1.0, 2.0), (float("inf"), 4.0)]) == 1.0   # beyond the last bound


LOAD_FIELDS = ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "tpot_p50_ms",
               "tpot_p95_ms", "tpot_p99_ms", "encode_wait_p50_ms", "encode_wait_p99_ms", "encode_wait_mean_ms")


def test_a_short_run_on_the_tiny_stack_reports_every_workload_and_the_goodput(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.common, "OUT", tmp_path)
    # An SLO no answer misses on a loaded machine: what is asserted is that every arrival of each rate is answered.
    assert goodput.main(["--workloads", "repeats-90,rate-sweep", "--callers", "1", "--requests-per-caller", "6",
                         "--rates", "1,2", "--duration", "3", "--warmup", "1", "--ttft-slo-s", "60",
                         "--tpot-slo-ms", "10000", "--name", "test"]) == 0
    results = json.loads((tmp_path / "goodput-test.json").read_text())
    assert set(results["workloads"]) == {"repeats-90", "rate-sweep"}
    repeats = results["workloads"]["repeats-90"]
    assert (repeats["requests"], repeats["ok"], repeats["errors"]) == (6, 6, {})
    # One caller: a repeated image was cached by an earlier, finished request.
    assert 0 < repeats["cache_hit_ratio"] < 1 and 0 < repeats["encode_wait_count"] < 6
    sweep = results["workloads"]["rate-sweep"]["new-images"]
    assert set(sweep["rates"]) == {"1", "2"}
    for value in [repeats, *sweep["rates"].values()]:
        assert all(value[name] > 0 for name in LOAD_FIELDS), value
        assert value["ttft_p50_ms"] <= value["ttft_p95_ms"] <= value["ttft_p99_ms"]
    for value in sweep["rates"].values():
        assert value["ok"] == value["requests"] > 0 and value["errors"] == {} and value["client_dropped"] == 0
        assert value["meets_slo"] and value["cache_hit_ratio"] == 0.0
        assert value["encode_wait_count"] == value["ok"]   # every image new: each request waited for its encode
    assert sweep["goodput_rps"] == results["goodput_rps"] == 2.0 and sweep["is_lower_bound"]
    assert results["slo"] == {"ttft_s": 60.0, "tpot_ms": 10000.0, "max_error_share": 0.0}
