"""The latency SLO a load is held to, and the goodput: the highest arrival rate a stack serves within it.

A rate meets the SLO when at least one request was answered, p99 TTFT and p99 TPOT are within their bounds (no
TPOT, every answer one token long: met), and the requests not answered (errors of any status code, and arrivals
dropped at the outstanding cap) are at most `max_error_share` of the arrivals. The goodput is the highest rate such
that it and every lower rate swept meet it: a rate the stack serves only some of the time is not one it sustains.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_ms: float = 50.0
    max_error_share: float = 0.0   # of the arrivals: errors of any code and client drops


def meets_slo(results: dict, slo: Slo) -> bool:
    """Whether one load's results (bench.load_run.summarize's keys) meet `slo`."""
    num_arrivals = results["requests"] + results["client_dropped"]
    num_unanswered = num_arrivals - results["ok"]
    if not results["ok"] or num_unanswered > slo.max_error_share * num_arrivals:
        return False
    tpot = results["tpot_p99_ms"]
    return results["ttft_p99_ms"] <= 1000 * slo.ttft_s and (tpot is None or tpot <= slo.tpot_ms)


def goodput(by_rate: dict[float, dict], slo: Slo) -> float:
    """The highest arrival rate such that it and every lower rate of `by_rate` meet `slo`; 0 when the lowest does
    not (or there is none)."""
    best = 0.0
    for rate in sorted(by_rate):
        if not meets_slo(by_rate[rate], slo):
            break
        best = rate
    return best
