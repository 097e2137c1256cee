"""The build: the compiled extension, its registered kernels, and the package without it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import backends

from helpers import require_extension

REQUIRE_CUDA = os.environ.get("RTDETR_REQUIRE_CUDA_EXTENSION", "0") == "1"


def test_extension_registers_cpu_kernels_for_every_op():
    ext = require_extension()
    ops = ext.OPS.split(",")
    assert "ms_deform_attn_forward" in ops and "ms_deform_attn_backward" in ops
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rtdetr_kernels_C::{op}", "CPU"), op


def test_extension_registers_cuda_kernels_for_every_op_when_built_with_cuda():
    ext = require_extension()
    if REQUIRE_CUDA and torch.version.cuda:
        assert ext.WITH_CUDA, "a CUDA build was required (nvcc and a CUDA torch are present) but _C has no CUDA kernels"
    if not ext.WITH_CUDA:
        pytest.skip("rtdetr_kernels._C was built without CUDA")
    assert ext.CUDA_ARCHS, "the CUDA build records its architectures"
    for op in ext.OPS.split(","):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rtdetr_kernels_C::{op}", "CUDA"), op


def test_info_reports_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "rtdetr_kernels", "info"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out
    assert "ms_deform_attn on cpu: auto -> " in out
    ext = backends.load_extension()
    if ext is not None and ext.WITH_CUDA:
        assert f"archs {ext.CUDA_ARCHS}" in out and "ms_deform_attn_forward: kernels for CPU, CUDA" in out
    for op in backends.registered_ops():
        assert f"{op} on cpu" in out


def _run_blocked(blocked: str, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where importing ``blocked`` fails."""
    script = textwrap.dedent(f"""
        import sys, torch
        for name in [m for m in sys.modules if m == {blocked!r} or m.startswith({blocked!r} + ".")]:
            del sys.modules[name]
        sys.modules[{blocked!r}] = None  # makes `import {blocked}` raise ImportError
    """) + textwrap.dedent(body)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("RTDETR_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def test_package_works_without_the_extension():
    result = _run_blocked("rtdetr_kernels._C", """
        import torch, rtdetr_kernels
        from rtdetr_kernels import backends
        v = torch.randn(1, 20, 2, 4); loc = torch.rand(1, 3, 2, 1, 2, 2); w = torch.rand(1, 3, 2, 1, 2)
        out = rtdetr_kernels.ms_deform_attn(v, [(4, 5)], loc, w)
        assert out.shape == (1, 3, 8)
        call = backends.Call("ms_deform_attn", "cpu", (torch.float32,))
        assert backends.select(call) == "reference"
        reason = backends.why_not("cpu", call)
        assert "not available" in reason, reason
        try:
            rtdetr_kernels.ms_deform_attn(v, [(4, 5)], loc, w, backend="cpu")
        except rtdetr_kernels.BackendUnavailableError as e:
            assert "rtdetr_kernels._C" in str(e)
        else:
            raise AssertionError("explicit cpu backend without _C must raise")
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_package_works_without_triton():
    result = _run_blocked("triton", """
        import torch, rtdetr_kernels
        from rtdetr_kernels import backends
        v = torch.randn(1, 20, 2, 4); loc = torch.rand(1, 3, 2, 1, 2, 2); w = torch.rand(1, 3, 2, 1, 2)
        ref = rtdetr_kernels.ms_deform_attn(v, [(4, 5)], loc, w, backend="reference")
        out = rtdetr_kernels.ms_deform_attn(v, [(4, 5)], loc, w)
        assert torch.allclose(out, ref, atol=1e-6)
        assert "triton is not importable" in backends.why_not("triton", backends.Call("ms_deform_attn", "cuda", (torch.float32,)))
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_version_and_public_api():
    assert rtdetr_kernels.__version__
    for name in ("ms_deform_attn", "use_backend", "explain", "BackendUnavailableError"):
        assert hasattr(rtdetr_kernels, name), name


def test_source_directory_imported_as_kernels_defines_nothing():
    """With the repository root on sys.path the source directory is importable as ``kernels``, which is
    also Hugging Face's kernel-hub package (transformers imports it on `import transformers...` to
    probe for it). That import must not define the ops again: torch would replace them and every
    handle taken by the first import would dangle (seen as an intermittent INTERNAL ASSERT in CI)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(rtdetr_kernels.__file__)))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        pytest.skip("rtdetr_kernels is installed, not run from the source tree")
    body = textwrap.dedent("""
        import importlib, torch
        import rtdetr_kernels
        from torch._library import custom_ops
        libraries = dict(custom_ops.OPDEF_TO_LIB)
        assert any(name.startswith("rtdetr_kernels::") for name in libraries)
        kernels = importlib.import_module("kernels")  # what transformers' probe does
        assert getattr(kernels, "__version__", "N/A") == "N/A"
        try:
            kernels.topk_select
        except AttributeError as e:
            assert "import rtdetr_kernels" in str(e), e
        else:
            raise AssertionError("kernels.topk_select resolved")
        try:
            importlib.import_module("kernels.topk.op")
        except ImportError as e:
            assert "import rtdetr_kernels" in str(e), e
        else:
            raise AssertionError("kernels.topk.op imported")
        assert all(custom_ops.OPDEF_TO_LIB[k] is v for k, v in libraries.items()), "an op was redefined"
        scores, indices, _ = rtdetr_kernels.topk_select(torch.randn(2, 9, 3), 4)
        assert indices.shape == (2, 4)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", body], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
