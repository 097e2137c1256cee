"""Shared settings of the microbenchmarks: time budget (RTDETR_BENCH_BUDGET_S), quick mode
(RTDETR_BENCH_QUICK=1), the device name recorded with every result, the versions recorded in the JSON's
machine_info, and the order the benchmarks run in (see pytest_collection_modifyitems)."""

import os
import statistics
import time

import pytest
import torch

_START = time.monotonic()


def budget_left() -> float:
    budget = float(os.environ.get("RTDETR_BENCH_BUDGET_S", "inf"))
    return budget - (time.monotonic() - _START)


def quick() -> bool:
    return os.environ.get("RTDETR_BENCH_QUICK", "0") == "1"


def time_once_ms(fn, device: str) -> float:
    """One call of ``fn`` in ms: CUDA-event time on a GPU, wall time on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_rounds_ms(fn, rounds: int, device: str):
    """(median, min) of ``rounds`` timed calls, in ms, after a warm-up call."""
    fn()
    times = [time_once_ms(fn, device) for _ in range(rounds)]
    return statistics.median(times), min(times)


def record_timing(benchmark, run, device: str, **info) -> None:
    """Time ``run`` for a pytest-benchmark test: on the CPU about 1.5 s of rounds (10 to 200), on a GPU
    50 rounds of CUDA events; the median and minimum go into ``extra_info`` with ``info`` and the device
    (``cuda_event_median_ms`` on a GPU), and pytest-benchmark's own rounds (synchronised) follow."""
    if device == "cpu":
        _, once_ms = time_rounds_ms(run, 1, device)
        rounds = max(10, min(200, int(1500 / max(once_ms, 1e-3))))
    else:
        rounds = 50
    median_ms, min_ms = time_rounds_ms(run, rounds, device)
    benchmark.extra_info.update(info, device=device_name(device), median_ms=median_ms, min_ms=min_ms)
    if device == "cuda":
        benchmark.extra_info["cuda_event_median_ms"] = median_ms

    def synced():
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.pedantic(synced, rounds=min(rounds, 20), iterations=1, warmup_rounds=1)


def paired_ratios(ours, anchor, device: str, budget_ms: float = 4000.0) -> dict:
    """``ours`` and ``anchor`` called alternately (which goes first alternates too), as many rounds as fit in
    about ``budget_ms`` (20 to 400): the median and 10th percentile of the per-round ratios anchor / ours
    (> 1: ours faster; a shared host's drifting speed does not bias it), the ratio of the minimums, and
    each side's median time."""
    _, once = time_rounds_ms(ours, 1, device)
    rounds = max(20, min(400, int(budget_ms / max(2 * once, 1e-3))))
    times = {"ours": [], "anchor": []}
    for i in range(rounds):
        for side in (("ours", "anchor") if i % 2 == 0 else ("anchor", "ours")):
            times[side].append(time_once_ms(ours if side == "ours" else anchor, device))
    ratios = sorted(a / o for a, o in zip(times["anchor"], times["ours"]))
    return dict(rounds=rounds, paired_ratio_median=statistics.median(ratios), paired_ratio_p10=ratios[len(ratios) // 10],
                paired_ratio_of_mins=min(times["anchor"]) / min(times["ours"]),
                ours_median_ms=statistics.median(times["ours"]), anchor_median_ms=statistics.median(times["anchor"]))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.fixture(autouse=True)
def _budget():
    if budget_left() <= 0:
        pytest.skip("benchmark time budget (RTDETR_BENCH_BUDGET_S) spent")
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled: uses torch.compile (slow to warm up)")
    torch.set_num_threads(int(os.environ.get("RTDETR_BENCH_THREADS", "2")) if not torch.cuda.is_available()
                          else torch.get_num_threads())


def pytest_benchmark_update_machine_info(config, machine_info):
    """The versions (and GPU compute capability) of the run, in the JSON itself, where bench/report.py reads them."""
    versions = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for name in ("triton", "rtdetr_kernels"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "unknown")
        except ImportError:
            pass
    gpu = torch.cuda.is_available()
    machine_info["rtdetr"] = {"versions": versions,
                              "capability": "%d.%d" % torch.cuda.get_device_capability() if gpu else None}


def pytest_collection_modifyitems(items):
    """Run every provider of one (dtype, case, mode) together, float32 first, torch.compile'd anchors at the end:
    when the time budget runs out, each group measured so far has ours and its anchors, so its speedups exist
    (pytest's own order runs one provider through every case before the next)."""
    params = [item.callspec.params if hasattr(item, "callspec") else {} for item in items]
    rank = {}  # (parameter, value) -> when pytest's own order first shows it
    for p in params:
        for name, value in p.items():
            rank.setdefault((name, repr(value)), len(rank))

    def order(p):
        compiled = str(p.get("provider", "")).endswith("-compiled")
        return (compiled, *(rank.get((name, repr(p.get(name))), -1) for name in ("dtype", "case", "mode")))

    keys = {id(item): order(p) for item, p in zip(items, params)}
    items.sort(key=lambda item: keys[id(item)])
