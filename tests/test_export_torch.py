"""torch.export and AOTInductor (``rtdetr_kernels.export``).

- ``torch.export.export`` of a patched model keeps our ops in the graph (not a decomposition), runs,
  matches eager, and survives ``torch.export.save`` / ``load``.
- ``rtdetr_kernels.export.lower`` turns MSDA into a direct call of the C++ op
  ``rtdetr_kernels_C::ms_deform_attn_forward`` and attention / top-K into their reference's ATen ops; an AOTInductor
  package of a module that calls all three runs in a fresh process that loads only the compiled
  extension (``torch.ops.load_library``) and refuses to import ``rtdetr_kernels`` at all.

The AOTInductor package is built from a small module (the three ops with a linear layer around
them), not the whole model: on this project's 2-core CI machine the tiny patched RT-DETR takes
minutes to compile (bench/export_bench.py measures it; its lowering alone, a retrace of the whole
graph, took two minutes under load), so the lowering is checked on the small module too. The wrapper is compiled at -O0 (``aot_inductor.compile_wrapper_opt_level``; the kernels
keep their optimisation), which cuts the compile from ~100 s to ~35 s there.

Tolerances: the exported graph runs the same kernels as eager (the ops' registered forms instead of
the eager fast path), so the defaults of ``assert_close`` for float32 hold; the lowered graph and
the package call the same C++ kernel and ATen ops, compiled by Inductor: 1e-5.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import export as rk_export

from helpers import require_extension

OUR_OPS = {"rtdetr_kernels.ms_deform_attn.default", "rtdetr_kernels.aifi_attention.default",
           "rtdetr_kernels.topk_select.default"}


def _targets(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


class Outputs(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["pred_logits"], out["pred_boxes"]


@pytest.fixture(scope="module")
def patched():
    from rtdetr.testing import randomize_
    from rtdetr_kernels.demo.model import build

    model = randomize_(build("tiny", num_classes=7), seed=0, score_scale=8.0).eval()
    handle = rtdetr_kernels.patch(model)
    assert {r.kind for r in handle.replaced} == {"msda", "attention", "topk"}, handle.report()
    model = Outputs(model).eval()
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    ep = torch.export.export(model, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        want = model(images)
    return model, images, want, ep


def test_export_keeps_our_ops(patched):
    _, _, _, ep = patched
    targets = _targets(ep)
    assert OUR_OPS <= targets
    assert not any("grid_sampler" in t for t in targets)  # not the reference's decomposition
    assert not any(t.startswith("rtdetr_kernels_C.") for t in targets)


@pytest.mark.parametrize("batch", [1, 2])
def test_exported_program_matches_eager(patched, batch):
    _, images, want, ep = patched
    with torch.no_grad():
        got = ep.module()(images[:batch])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w[:batch])


def test_exported_program_save_load(patched):
    _, images, want, ep = patched
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert OUR_OPS <= _targets(loaded)
    with torch.no_grad():
        got = loaded.module()(images)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------------------------
# AOTInductor: a package served without the Python package
# ----------------------------------------------------------------------------------------------

SHAPES = [(9, 7), (3, 8), (5, 4)]
S = sum(h * w for h, w in SHAPES)
M, D, LQ, K = 4, 8, 11, 5


class ThreeOps(torch.nn.Module):
    """MSDA (RT-DETRv2 per-level points), attention over its output, top-K of a linear score."""

    def __init__(self):
        super().__init__()
        E = M * D
        g = torch.Generator().manual_seed(3)
        self.mha = torch.nn.MultiheadAttention(E, M, batch_first=True)
        self.score = torch.nn.Linear(E, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)

    def forward(self, value, loc, w):
        out = rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, w, num_points_list=[2, 3, 1])  # [N, LQ, E]
        out = rtdetr_kernels.aifi_attention(out, None, self.mha.in_proj_weight, self.mha.in_proj_bias,
                                            self.mha.out_proj.weight, self.mha.out_proj.bias, M)
        scores, indices, (picked,) = rtdetr_kernels.topk_select(self.score(out), K, (out,))
        return scores, indices, picked


def _three_ops_inputs(N, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, S, M, D, generator=g), torch.rand(N, LQ, M, 6, 2, generator=g) * 1.2 - 0.1,
            torch.rand(N, LQ, M, 6, generator=g))


def _fast_wrapper_configs():
    key = "aot_inductor.compile_wrapper_opt_level"
    return {key: "O0"} if key in torch._inductor.config.get_config_copy() else {}


_SERVE = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):  # the serving process must not need the package
        def find_spec(self, name, path=None, target=None):
            if name == "rtdetr_kernels" or name.startswith("rtdetr_kernels.") or name == "rtdetr":
                raise ImportError(f"{name} must not be imported here")
            return None

    sys.meta_path.insert(0, Refuse())
    import torch
    library, package, io_path = sys.argv[1:4]
    torch.ops.load_library(library)
    runner = torch._inductor.aoti_load_package(package)
    cases = torch.load(io_path)
    results = [runner(*inputs) for inputs in cases]
    torch.save(results, io_path + ".out")
    assert not [m for m in sys.modules if m == "rtdetr_kernels" or m.startswith("rtdetr_kernels.")]
    print("served", len(results))
""")


def test_lowered_graph_calls_the_cpp_op():
    """``lower``: MSDA as the C++ op, nothing left that needs the Python package; same results."""
    require_extension()
    module = ThreeOps().eval()
    inputs = _three_ops_inputs(2, seed=0)
    ep = torch.export.export(module, inputs)
    assert OUR_OPS <= _targets(ep)
    lowered = rk_export.lower(ep)
    targets = _targets(lowered)
    assert "rtdetr_kernels_C.ms_deform_attn_forward.default" in targets
    assert not any(t.startswith("rtdetr_kernels.") for t in targets)
    with torch.no_grad():
        got, want = lowered.module()(*inputs), module(*inputs)
    assert torch.equal(got[1], want[1])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_aoti_package_runs_without_the_python_package(tmp_path):
    require_extension()
    library = rk_export.extension_library()
    assert library and os.path.exists(library)
    module = ThreeOps().eval()
    package = rk_export.aoti_package(module, _three_ops_inputs(2, seed=0), tmp_path / "three_ops.pt2",
                                     inductor_configs=_fast_wrapper_configs())
    cases = [_three_ops_inputs(1, seed=1), _three_ops_inputs(2, seed=2)]
    torch.save(cases, tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _SERVE, library, package, str(tmp_path / "io.pt")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served 2" in done.stdout
    results = torch.load(tmp_path / "io.pt.out")
    for inputs, got in zip(cases, results):
        with torch.no_grad():
            want = module(*inputs)
        assert torch.equal(got[1], want[1])  # the same tokens, in the same order
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)
