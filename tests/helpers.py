"""Helpers shared by the op tests: which (device, backend) pairs can run here, tolerances."""

from __future__ import annotations

import os
from typing import List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rtdetr_kernels import backends

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REQUIRE_EXTENSION = os.environ.get("RTDETR_REQUIRE_EXTENSION", "0") == "1"


def require_extension():
    """The compiled rtdetr_kernels._C; a failure where it is required (make test), else a skip."""
    ext = backends.load_extension()
    if ext is None:
        if REQUIRE_EXTENSION:
            pytest.fail(f"rtdetr_kernels._C is required here but failed to load: {backends.extension_error()}")
        pytest.skip(f"rtdetr_kernels._C is not built: {backends.extension_error()}")
    return ext


def backend_params(op: str) -> List[Tuple[str, str]]:
    """Every (device, backend) pair that is built and usable here, as pytest params.

    Pairs that cannot run are still listed, and skipped with the reason (so a missing build is
    visible in the summary rather than silently untested).
    """
    params = []
    for device in DEVICES:
        for backend in backends.BACKENDS:
            call = backends.Call(op, device, (torch.float32,))
            reason = backends.why_not(backend, call)
            marks = [pytest.mark.skip(reason=f"{backend} on {device}: {reason}")] if reason else []
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def skip_if_interpreted_bf16(device: str, backend: str, dtype: torch.dtype) -> None:
    """bf16 arithmetic is wrong in the Triton interpreter (stored as uint16); test bf16 on GPU."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 is not supported by the Triton interpreter")


class OpCalls(TorchDispatchMode):
    """Records the arguments of every call to the registered op ``rtdetr_kernels::<name>``."""

    def __init__(self, name: str):
        super().__init__()
        self.qualname = f"rtdetr_kernels.{name}.default"
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == self.qualname:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))
