"""Shared settings of the microbenchmarks: time budget (RTDETR_BENCH_BUDGET_S), quick mode
(RTDETR_BENCH_QUICK=1), and the device name recorded with every result."""

import os
import time

import pytest
import torch

_START = time.monotonic()


def budget_left() -> float:
    budget = float(os.environ.get("RTDETR_BENCH_BUDGET_S", "inf"))
    return budget - (time.monotonic() - _START)


def quick() -> bool:
    return os.environ.get("RTDETR_BENCH_QUICK", "0") == "1"


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
