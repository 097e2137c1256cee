"""Ahead-of-time compile of every Triton kernel configuration, for sm_80 and sm_90, without a GPU
(``RTDETR_AOT_ARCHS`` picks a subset).

Each op's ``rtdetr_kernels.<op>.triton`` module lists in ``aot_specs()`` every (kernel, constexpr
configuration) its dispatcher can launch, as ``(name, jit_fn, signature, constexprs)``. The test
compiles each one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` down to
PTX and cubin. This catches what the interpreter lets through (type errors in untaken constexpr
branches, layout problems, unsupported ops).

The compile must not run under ``TRITON_INTERPRET`` (jit functions are interpreter objects then),
and tests/conftest.py sets it on GPU-less machines before triton is imported, so the work runs in
child processes (one per architecture, in parallel) with the variable removed.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import time

import pytest

if __name__ != "__main__":
    pytest.importorskip("triton")

OP_MODULES = ("rtdetr_kernels.ms_deform_attn.triton", "rtdetr_kernels.attention.triton", "rtdetr_kernels.topk.triton")
# RTDETR_AOT_ARCHS="80" (or "90"): one architecture; CI's two lanes take one each (the compile is the
# slowest test here: about 6 minutes an architecture on one core)
ARCHS = tuple(int(a) for a in os.environ.get("RTDETR_AOT_ARCHS", "80,90").split(",") if a.strip())


def _spec_modules():
    mods = []
    for name in OP_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "aot_specs"):
            mods.append((name, mod))
    return mods


def _make_source(fn, signature: dict, constexprs: dict):
    """An ASTSource for triton 3.2 .. 3.8 (the constexpr argument changed name and key type)."""
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:  # triton >= 3.2 lists constexprs in the signature
        sig[k] = "constexpr"
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    try:  # triton 3.2: `constants`, keyed by argument name or index tuple
        return ASTSource(fn=fn, signature=sig, constants=dict(constexprs))
    except Exception:
        keyed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        return ASTSource(fn=fn, signature=sig, constants=keyed)


def _compile_all(cc: int) -> dict:
    """Child process: compile every spec for one architecture; returns {name: result}."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cc, 32)
    results = {}
    for mod_name, mod in _spec_modules():
        for spec in mod.aot_specs():
            name, fn, signature, constexprs = spec[:4]
            options = spec[4] if len(spec) > 4 else {}
            key = f"{mod_name}:{name}"
            start = time.perf_counter()
            try:
                compiled = triton.compile(_make_source(fn, signature, constexprs), target=target, options=options or None)
                asm = getattr(compiled, "asm", {}) or {}
                results[key] = {"ok": "ptx" in asm and bool(asm["ptx"]), "stages": sorted(asm), "s": time.perf_counter() - start}
            except Exception as exc:  # report every failure, not just the first
                results[key] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}", "s": time.perf_counter() - start}
    return results


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["RTDETR_TEST_NO_INTERPRETER"] = "1"
    # make the package importable the way it is importable here (editable install or a path entry)
    import rtdetr_kernels

    pkg_dir = os.path.dirname(os.path.abspath(rtdetr_kernels.__file__))
    if os.path.basename(pkg_dir) == "rtdetr_kernels":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(pkg_dir), env.get("PYTHONPATH")) if p)
    return env


def test_specs_are_listed():
    mods = _spec_modules()
    assert any(name.endswith("ms_deform_attn.triton") for name, _ in mods), "ms_deform_attn has no aot_specs()"
    assert any(name.endswith("attention.triton") for name, _ in mods), "aifi_attention has no aot_specs()"
    for name, mod in mods:
        specs = mod.aot_specs()
        assert specs, f"{name}.aot_specs() is empty"
        names = [s[0] for s in specs]
        assert len(names) == len(set(names)), f"{name}: duplicate spec names"
        for spec in specs:
            assert len(spec) in (4, 5), f"{name}: a spec is (name, jit_fn, signature, constexprs[, options]), got {spec!r}"
            _, fn, signature, constexprs = spec[:4]
            arg_names = list(getattr(fn, "arg_names", []))
            missing = [a for a in arg_names if a not in signature and a not in constexprs]
            assert not missing, f"{name}:{spec[0]}: arguments without a type or constexpr value: {missing}"


def test_aot_compile_all_configs():
    pytest.importorskip("triton")
    procs = {}
    for cc in ARCHS:
        procs[cc] = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(cc)], env=_child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failures, total = [], 0
    for cc, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"sm_{cc} compile worker failed (rc {proc.returncode}):\n{err[-4000:]}"
        results = json.loads(out.strip().splitlines()[-1])
        assert results, f"sm_{cc}: no kernel specs were compiled"
        total += len(results)
        for key, res in results.items():
            if not res["ok"]:
                failures.append(f"sm_{cc} {key}: {res.get('error', 'no ptx produced, stages ' + str(res.get('stages')))}")
    assert not failures, f"{len(failures)} of {total} AOT compiles failed:\n" + "\n".join(failures[:20])


if __name__ == "__main__":  # worker: python tests/test_triton_aot.py <cc>
    print(json.dumps(_compile_all(int(sys.argv[1]))))
