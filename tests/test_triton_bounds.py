"""The interpreter's bounds checker (tests/triton_bounds.py) catches what it is there to catch."""

import pytest
import torch

from helpers import interpreter

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import triton_bounds  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter() or torch.cuda.is_available(),
                                reason="the bounds checker wraps the Triton interpreter on CPU tensors")


@triton.jit
def _copy(src, dst, n, extra, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n + extra
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n, other=0.0), mask=mask)


@triton.jit
def _gather(src, idx, dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    i = tl.load(idx + offs, mask=offs < n, other=0)
    tl.store(dst + offs, tl.load(src + i, mask=offs < n, other=0.0), mask=offs < n)


@triton.jit
def _atomic(dst, idx, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    i = tl.load(idx + offs, mask=offs < n, other=0)
    tl.atomic_add(dst + i, 1.0, mask=offs < n)


def test_installed():
    from triton.runtime import interpreter as interp

    assert getattr(interp, "_rtdetr_bounds_checked", False)


def test_in_bounds_passes():
    n = 13
    src = torch.randn(n)
    dst = torch.full((n,), float("nan"))
    _copy[(1,)](src, dst, n, 0, BLOCK=16)
    assert torch.equal(dst, src)


def test_store_past_the_end_is_caught():
    n = 13
    src = torch.randn(64)[:n]  # the storage is larger than the view: still in bounds below
    dst = torch.randn(n)
    before = dst.clone()
    with pytest.raises(Exception, match="store of 1 lane"):
        _copy[(1,)](src, dst, n, 1, BLOCK=16)  # lane n stores one past dst's storage
    assert torch.equal(dst, before)  # nothing was written


def test_load_through_bad_index_is_caught():
    n = 9
    src, dst = torch.randn(n), torch.randn(n)
    idx = torch.randint(0, n, (n,), dtype=torch.int32)
    _gather[(1,)](src, idx, dst, n, BLOCK=16)
    assert torch.equal(dst, src[idx.long()])
    idx[4] = -3
    with pytest.raises(Exception, match="load of 1 lane"):
        _gather[(1,)](src, idx, dst, n, BLOCK=16)


def test_atomic_out_of_bounds_is_caught():
    n = 7
    dst = torch.zeros(n)
    idx = torch.arange(n, dtype=torch.int32)
    _atomic[(1,)](dst, idx, n, BLOCK=8)
    assert torch.equal(dst, torch.ones(n))
    idx[2] = n + 100
    with pytest.raises(Exception, match="atomic_rmw of 1 lane"):
        _atomic[(1,)](dst, idx, n, BLOCK=8)


def test_outside_a_launch():
    with pytest.raises(triton_bounds.TritonOutOfBounds, match="outside a kernel launch"):
        triton_bounds.check("load", [0], None, 4)


@pytest.mark.parametrize("case", ["D5-bilinear-edges-N2-Lq7-L16", "aifi_attention/triton-fp16-N2-L65-E128-h2-maskfloat"])
def test_sanitize_cases_interpret_mode(tmp_path, case):
    """`bench/sanitize_cases.py --interpret`: the GPU suite's sanitizer cases run on CPU tensors through the
    bounds-checked interpreter (a fresh process, as it must set TRITON_INTERPRET before triton loads)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "sanitize_interpret.json")
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "sanitize_cases.py"), "--backend", "triton",
                           "--interpret", "--check", "-k", case, "--json", out],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        records = json.load(f)
    cases = records["cases"]
    assert cases and all(c["status"] == "ok" for c in cases), cases
