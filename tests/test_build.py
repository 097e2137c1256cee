"""The build: the compiled extension, its registered kernels, and the package without it."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import _extension, backends

from helpers import require_extension

REQUIRE_CUDA = os.environ.get("RTDETR_REQUIRE_CUDA_EXTENSION", "0") == "1"
# set by CI's second lane, which installs the package from a wheel: it must be that install, with its extension
EXPECT_INSTALLED = os.environ.get("RTDETR_EXPECT_INSTALLED", "0") == "1"
# set where pip can reach an index: the real `pip wheel .` with build isolation (pip's default) is tried
TEST_PIP_ISOLATION = os.environ.get("RTDETR_TEST_PIP_ISOLATION", "0") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.dirname(os.path.abspath(rtdetr_kernels.__file__))


def _compiled_kernels(backend: str):
    """(op, kernel name) of every compiled kernel the registry's ``backend`` records run."""
    found = []
    for op in backends.registered_ops():
        if backend in backends.implemented_backends(op) and backends.implementation(op, backend).compiled:
            for kernel in backends.implementation(op, backend).kernels():
                found.append((op, kernel._qualified_op_name))
    return found


def test_extension_registers_cpu_kernels_for_every_op():
    require_extension()
    kernels = _compiled_kernels("cpu")
    assert ("ms_deform_attn", "rtdetr_kernels_C::ms_deform_attn_forward") in kernels
    assert {name for _, name in kernels} <= set(backends.extension_ops())
    for op, name in kernels:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), (op, name)


def test_extension_registers_cuda_kernels_for_every_op_when_built_with_cuda():
    ext = require_extension()
    if REQUIRE_CUDA and torch.version.cuda:
        assert ext.WITH_CUDA, "a CUDA build was required (nvcc and a CUDA torch are present) but _C has no CUDA kernels"
    if not ext.WITH_CUDA:
        pytest.skip("rtdetr_kernels._C was built without CUDA")
    assert ext.CUDA_ARCHS, "the CUDA build records its architectures"
    kernels = _compiled_kernels("cuda")
    assert ("ms_deform_attn", "rtdetr_kernels_C::ms_deform_attn_backward") in kernels
    for op, name in kernels:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), (op, name)


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
    source = os.path.dirname(os.path.abspath(rtdetr_kernels.__file__))
    # Installed, the package's folder is site-packages/rtdetr_kernels, and a `kernels` folder beside it
    # is Hugging Face's package (a test dependency), not this source.
    if os.path.basename(source) != "kernels":
        pytest.skip("rtdetr_kernels is installed, not run from the source tree")
    root = os.path.dirname(source)
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


# --------------------------------------------------------------------------------------------
# What the extension was built against, and installing as users do
# --------------------------------------------------------------------------------------------


def test_extension_records_the_torch_it_was_built_against():
    ext = require_extension()
    assert ext.TORCH_VERSION == torch.__version__
    info = _extension.build_info()
    assert info is not None, f"no {_extension.BUILD_INFO} next to the extension in {PACKAGE_DIR}"
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda, info
    assert bool(info["with_cuda"]) == bool(ext.WITH_CUDA) and info["cuda_archs"] == ext.CUDA_ARCHS, info


def test_version_mismatch_names_both_versions():
    assert _extension.version_mismatch(torch.__version__, torch.version.cuda) is None
    assert _extension.version_mismatch(None) is None  # a build that did not say
    msg = _extension.version_mismatch("2.0.0+cu118", "11.8", running_torch="2.11.0+cu130", running_cuda="13.0")
    assert "2.0.0+cu118" in msg and "2.11.0+cu130" in msg and "--no-build-isolation" in msg, msg
    msg = _extension.version_mismatch("2.11.0", "12.8", running_torch="2.11.0", running_cuda="13.0")
    assert "CUDA 12.8" in msg and "CUDA 13.0" in msg, msg  # same torch release, another CUDA build
    assert _extension.version_mismatch("2.11.0", "12.8", check_cuda=False, running_torch="2.11.0") is None


def test_extension_built_against_another_torch_is_refused(tmp_path):
    """A copy of the installed package whose record says another torch: the package warns at import
    naming both versions, never loads that _C, `info` gives the reason, and the ops fall back."""
    require_extension()
    copy = tmp_path / "rtdetr_kernels"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    fake = "2.0.0+cu118"
    (copy / _extension.BUILD_INFO).write_text(json.dumps({"torch": fake, "torch_cuda": "11.8", "with_cuda": True}))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RTDETR_KERNELS_BACKEND")}
    env["PYTHONPATH"] = str(tmp_path)
    body = textwrap.dedent(f"""
        import sys, warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import rtdetr_kernels
        assert rtdetr_kernels.__file__.startswith({str(tmp_path)!r}), rtdetr_kernels.__file__
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any({fake!r} in m and torch.__version__ in m for m in messages), messages
        from rtdetr_kernels import backends
        assert backends.load_extension() is None
        assert "rtdetr_kernels._C" not in sys.modules, "the mismatched extension was loaded"
        assert {fake!r} in backends.extension_error() and torch.__version__ in backends.extension_error()
        call = backends.Call("ms_deform_attn", "cpu", (torch.float32,))
        assert backends.select(call) == "reference"
        assert {fake!r} in backends.why_not("cpu", call)
        v = torch.randn(1, 20, 2, 4); loc = torch.rand(1, 3, 2, 1, 2, 2); w = torch.rand(1, 3, 2, 1, 2)
        out = rtdetr_kernels.ms_deform_attn(v, [(4, 5)], loc, w)
        ref = rtdetr_kernels.ms_deform_attn(v, [(4, 5)], loc, w, backend="reference")
        assert torch.equal(out, ref)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
    result = subprocess.run([sys.executable, "-m", "rtdetr_kernels", "info"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("extension rtdetr_kernels._C"))
    assert "not available" in line and fake in line and torch.__version__ in line, line
    assert fake in result.stderr, "no warning at import"  # the warning, once, on stderr


def test_setup_without_torch_says_what_to_run_in_one_line():
    """pip's default build isolation hides the installed torch from setup.py: it must stop with one
    line that says what to run, not a traceback."""
    setup_py = os.path.join(REPO, "setup.py")
    if not os.path.isfile(setup_py):
        pytest.skip("no setup.py next to the tests")
    body = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["torch"] = None  # as in pip's isolated build environment: `import torch` fails
        sys.argv = ["setup.py", "bdist_wheel"]
        runpy.run_path({setup_py!r}, run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", body], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-build-isolation" in lines[0], result.stderr


@pytest.mark.skipif(not TEST_PIP_ISOLATION, reason="needs an index for pip's isolated build environment "
                    "(RTDETR_TEST_PIP_ISOLATION=1, set in CI)")
def test_pip_wheel_with_build_isolation_stops_with_the_one_line(tmp_path):
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    for name in ("kernels", "rtdetr", "csrc"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "pip install --no-build-isolation" in output and "Traceback" not in output, output


@pytest.mark.skipif(not EXPECT_INSTALLED, reason="the wheel check runs in CI's second lane (RTDETR_EXPECT_INSTALLED=1)")
def test_installed_from_a_wheel_with_its_extension():
    """The second CI lane installs the wheel from `pip wheel --no-build-isolation .` into its venv."""
    assert "site-packages" in PACKAGE_DIR.split(os.sep), f"rtdetr_kernels is imported from {PACKAGE_DIR}, not an install"
    ext = backends.load_extension()
    assert ext is not None, backends.extension_error()
    assert os.path.dirname(os.path.abspath(ext.__file__)) == PACKAGE_DIR
    assert os.path.isfile(os.path.join(PACKAGE_DIR, _extension.BUILD_INFO))
    import rtdetr

    assert "site-packages" in os.path.abspath(rtdetr.__file__).split(os.sep), rtdetr.__file__
