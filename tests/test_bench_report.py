"""bench.py's report, from made-up results (no benchmark runs): the targets stand beside the
figures, and the SUMMARY line is the last line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("zchat_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flow(system: str, senders: int, subs: int, in_per_s: float, **extra: object) -> dict:
    return {"system": system, "senders": senders, "subscribers": subs, "in_per_s": in_per_s,
            "out_per_s": in_per_s * subs, "loss": 0.0, "generators_cpu": 50, "errors": {},
            "frame_bytes_out": 204, "offered": None,
            "cpu": {"main": 90.0, "io": 30.0, "total": 121.0}, **extra}


def latency(system: str, offered: int, p99: float) -> dict:
    return flow(system, 1, 10, offered, offered=offered, p50_ms=p99 / 2, p99_ms=p99, p999_ms=p99 * 2,
                max_ms=p99 * 3)


def results(bench, zchat_1x1: float, zchat_p99: float) -> dict:  # type: ignore[no-untyped-def]
    res = {"meta": {"mode": "quick", "cpus": 2, "python": "3", "pyzmq": "27", "libzmq": "4.3.5",
                    "broker": "python -m zchat broker", "tp_duration": 1.0, "lat_duration": 1.5},
           "throughput": [flow("proxy", 1, 1, 300_000.0), flow("zchat", 1, 1, zchat_1x1)],
           "latency": [latency("proxy", 1_000, 0.5), latency("zchat", 1_000, 0.6),
                       latency("proxy", 10_000, 1.0), latency("zchat", 10_000, zchat_p99)],
           "crashes": []}
    res["summary"] = bench.summary(res)
    return res


def test_targets_reached_are_said_beside_the_figures(bench) -> None:  # type: ignore[no-untyped-def]
    lines = bench.print_report(results(bench, 180_000.0, 1.2), show=False)
    text = "\n".join(lines)
    assert "target 1x1: in >= 0.50x the proxy (then 0.60x): 0.60x, reached; stretch reached" in text
    assert "target 10k msg/s: p99 <= 2 ms and <= 1.3x the proxy's: 1.20 ms, 1.20x, reached" in text
    assert lines[-1].startswith("SUMMARY: throughput zchat/proxy 0.60x at 1x1 (target 0.5x)")
    assert "p99 at 10k msg/s x10 subs 1.20 ms (proxy 1.00 ms, 1.20x; target <= 2 ms and 1.3x)" in lines[-1]


def test_targets_missed_are_said_too(bench) -> None:  # type: ignore[no-untyped-def]
    text = "\n".join(bench.print_report(results(bench, 120_000.0, 1.5), show=False))
    assert "0.40x, NOT reached" in text
    assert "1.50 ms, 1.50x, NOT reached" in text  # under 2 ms, but over 1.3x the proxy's
