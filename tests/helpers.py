"""Helpers shared by the op tests: which (op, device, backend) triples can run here, deterministic mode,
recording the registered ops' calls."""

from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Sequence

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


def compiled_kernel(find, source: str):
    """``find()``, a compiled kernel of the extension, or a skip (a failure where the extension is
    required) when the extension is not built, or was built before ``source`` existed."""
    require_extension()
    kernel = find()
    if kernel is None:
        message = f"rtdetr_kernels._C has no kernel from {source} (built before it existed)"
        if REQUIRE_EXTENSION:
            pytest.fail(message)
        pytest.skip(message)
    return kernel


def pair_skip_reason(op: str, device: str, backend: str) -> Optional[str]:
    """Why the registry says ``backend`` cannot serve ``op`` on ``device`` tensors at all (float32), or None."""
    reason = backends.why_not(backend, backends.Call(op, device, (torch.float32,)))
    return None if reason is None else f"{backend} on {device}: {reason}"


def op_backend_params(ops: Sequence[str], skips: bool = True) -> list:
    """Every (op, device, backend) triple as pytest params with ids "op-device-backend".

    Triples that cannot run are still listed, and (with ``skips``) skipped with the reason, so that a
    missing build is visible in the summary rather than silently untested.
    """
    params = []
    for op in ops:
        for device in DEVICES:
            for backend in backends.BACKENDS:
                reason = pair_skip_reason(op, device, backend) if skips else None
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                params.append(pytest.param(op, device, backend, id=f"{op}-{device}-{backend}", marks=marks))
    return params


def backend_params(op: str) -> List:
    """Every (device, backend) pair for one op, as pytest params (skipped with the reason where the
    registry says the pair cannot run)."""
    return [pytest.param(*p.values[1:], id=p.id.split("-", 1)[1], marks=p.marks) for p in op_backend_params([op])]


def interpreter() -> bool:
    """Triton kernels run on CPU tensors through the interpreter in this process."""
    return backends.triton_interpreter()


def skip_if_interpreted_bf16(device: str, backend: str, dtype: torch.dtype) -> None:
    """bf16 arithmetic is wrong in the Triton interpreter (stored as uint16); test bf16 on GPU."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 is not supported by the Triton interpreter")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled) for the block; restores what was set before."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


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


def cuda_graph_replays(step, static: Sequence[torch.Tensor], fresh, seeds=(1, 2)):
    """CUDA-graph capture of ``step()`` (two warm-up calls on a side stream first: kernel compiles, the
    allocator's pools), then for each seed: ``fresh(seed)``'s tensors copied into the ``static`` inputs, a
    replay, and ``(captured, expected)`` yielded: the graph's outputs and an eager ``step()`` on the same
    inputs, for the caller to compare."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in seeds:
        with torch.no_grad():
            for dst, src in zip(static, fresh(seed)):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        yield captured, step()
