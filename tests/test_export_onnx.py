"""ONNX export (``rtdetr_kernels.onnx``) of the ops alone and of patched models, run in ONNX Runtime and
OpenVINO (both CPU, pinned in the Makefile).

What is checked: every exported graph passes the ONNX checker and, in the standard forms, holds no
custom-domain node; ONNX Runtime and OpenVINO give the PyTorch outputs (dynamic batch: one export run
at batch 1 and 2; the ops also at a token/query count other than the export's); fp16 exports of the
ops; the TensorRT plugin form structurally (the plugin needs a GPU); options without a translation
fail at export time naming the option.

Tolerances: the ops alone are compared with the op in float64 on unit-scale random inputs; the
runtimes' float32 results differ from it by at most ~2e-6 here (other summation orders), so 2e-5
leaves room without hiding a wrong corner or weight (those are O(0.1) errors). fp16 exports compute
in float32 like the op and round once: compared with the op's own fp16 output, a difference of one
fp16 rounding step (2^-10 relative) can come from a different float32 sum on either side of a
rounding boundary, hence 2e-3 relative + 1e-3 absolute. Patched models are compared with the same
patched model run by PyTorch in float32: measured differences are below 1e-6 on logits and boxes;
1e-4 leaves room. Random-init class heads are scaled up (``randomize_(score_scale=...)``) so that the
top-K query selection has no near-ties that fp32 rounding could reorder.

OpenVINO runs with ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with bf16 units it would otherwise
compute float32 models in bf16).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels.topk.op import topk_select_flat

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
rk_onnx = rtdetr_kernels.onnx

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
RUNTIMES = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed"))]
ATOL_OP = 2e-5
TOL_MODEL = 1e-4

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class Runner:
    """One exported model in one runtime; ``run(*tensors) -> [np.ndarray]``."""

    def __init__(self, runtime: str, proto):
        self.runtime = runtime
        data = proto.SerializeToString()
        if runtime == "onnxruntime":
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()]
        else:
            import openvino as ov

            core = ov.Core()
            model = core.read_model(model=data, weights=b"")
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "INFERENCE_NUM_THREADS": 2})

    def run(self, *tensors):
        arrays = [t.numpy() for t in tensors]
        if self.runtime == "onnxruntime":
            return self.session.run(None, dict(zip(self.names, arrays)))
        result = self.compiled(arrays)
        return [np.asarray(result[out]) for out in self.compiled.outputs]


def _t(a, like=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if like is None else t.to(like.dtype)


def _ops(proto):
    return [(n.domain, n.op_type) for n in proto.graph.node]


def _check_standard(program):
    proto = program.model_proto
    onnx.checker.check_model(proto)
    assert rk_onnx.custom_domains(proto) == []
    assert not any(d not in ("", "ai.onnx") for d, _ in _ops(proto))
    return proto


def _close(got, want, atol, rtol=0.0, what=""):
    torch.testing.assert_close(_t(got).to(torch.float64), want.detach().to(torch.float64), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# MSDA alone: every layout and method in one module, both standard forms
# ----------------------------------------------------------------------------------------------

SHAPES = [(9, 7), (3, 8), (5, 4)]  # portrait, landscape (the 'official' clamp differs there), odd sizes
S = sum(h * w for h, w in SHAPES)
POINTS = [2, 3, 1]  # RT-DETRv2's per-level point counts


class MSDACalls(torch.nn.Module):
    """v1 layout (4 points a level), v2 per-level points, and v2 'discrete' with both clamps."""

    def forward(self, value, loc6, w5, loc, w):
        return (rtdetr_kernels.ms_deform_attn(value, SHAPES, loc6, w5),
                rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, w, num_points_list=POINTS),
                rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, w, num_points_list=POINTS, method="discrete"),
                rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, w, num_points_list=POINTS, method="discrete",
                                              discrete_clamp="official"))


def _msda_inputs(N, Lq, seed, dtype=torch.float32, M=3, D=5):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(N, S, M, D, generator=g)
    # locations spill past [0, 1] so that zero padding, skipped points and the clamps all happen
    loc6 = torch.rand(N, Lq, M, len(SHAPES), 4, 2, generator=g) * 1.4 - 0.2
    w5 = torch.rand(N, Lq, M, len(SHAPES), 4, generator=g)
    loc = torch.rand(N, Lq, M, sum(POINTS), 2, generator=g) * 1.4 - 0.2
    w = torch.rand(N, Lq, M, sum(POINTS), generator=g)
    return tuple(t.to(dtype) for t in (value, loc6, w5, loc, w))


def _msda_dynamic():
    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    return ({0: batch}, {0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: queries})


@pytest.fixture(scope="module", params=["grid_sample", "gather"])
def msda_export(request):
    form = request.param
    program = rk_onnx.export(MSDACalls().eval(), _msda_inputs(2, 11, seed=0), msda=form, dynamic_shapes=_msda_dynamic())
    return form, _check_standard(program)


def test_msda_graph_forms(msda_export):
    form, proto = msda_export
    ops = [t for _, t in _ops(proto)]
    # grid_sample: one GridSample per level for each of the two bilinear calls; discrete is a gather in both forms
    assert ops.count("GridSample") == (2 * len(SHAPES) if form == "grid_sample" else 0)
    assert "GatherND" in ops


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("N,Lq", [(1, 11), (2, 11), (2, 7)])  # the export's shape was (2, 11)
def test_msda_matches_op(msda_export, runtime, N, Lq):
    form, proto = msda_export
    inputs = _msda_inputs(N, Lq, seed=10 + N + Lq)
    want = MSDACalls()(*(t.double() for t in inputs))
    got = Runner(runtime, proto).run(*inputs)
    for name, g, w in zip(("v1", "v2", "discrete per_axis", "discrete official"), got, want):
        _close(g, w, ATOL_OP, what=f"{form} {runtime} {name}")


@pytest.fixture(scope="module")
def msda_fp16():
    inputs = _msda_inputs(2, 9, seed=3, dtype=torch.float16)
    program = rk_onnx.export(MSDACalls().eval(), inputs, msda="grid_sample", dynamic_shapes=_msda_dynamic())
    proto = _check_standard(program)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    return inputs, proto


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_msda_fp16_export(msda_fp16, runtime):
    inputs, proto = msda_fp16
    want = MSDACalls()(*inputs)  # the op's fp16 result (fp32 math, one rounding)
    for b in (1, 2):
        got = Runner(runtime, proto).run(*(t[:b] for t in inputs))
        for g, w in zip(got, want):
            assert g.dtype == np.float16
            _close(g, w[:b], atol=1e-3, rtol=2e-3, what=f"fp16 {runtime} batch {b}")


# ----------------------------------------------------------------------------------------------
# MSDA: the TensorRT plugin form (structure only: running it needs TensorRT and a GPU)
# ----------------------------------------------------------------------------------------------


class MSDAv1(torch.nn.Module):
    def forward(self, value, loc6, w5):
        return rtdetr_kernels.ms_deform_attn(value, SHAPES, loc6, w5)


def _value_info(proto):
    inferred = onnx.shape_inference.infer_shapes(proto)
    info = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
            + list(inferred.graph.output)}
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in inferred.graph.initializer}
    for n in inferred.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return info, consts


def _dims(tensor_type):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_msda_tensorrt_plugin_node(dtype):
    value, loc6, w5, _, _ = _msda_inputs(2, 11, seed=5, dtype=dtype)
    if dtype == torch.float16:
        loc6 = loc6.float()  # AMP's mix: fp16 value, fp32 locations; the plugin takes one dtype
    program = rk_onnx.export(MSDAv1().eval(), (value, loc6, w5), msda="tensorrt")
    proto = program.model_proto
    onnx.checker.check_model(proto)
    plugins = [n for n in proto.graph.node if n.op_type == "MultiscaleDeformableAttnPlugin_TRT"]
    assert len(plugins) == 1 and plugins[0].domain == "trt"
    assert rk_onnx.custom_domains(proto) == [("trt", "MultiscaleDeformableAttnPlugin_TRT")]
    assert "GridSample" not in [t for _, t in _ops(proto)]
    info, consts = _value_info(proto)
    v, shapes, starts, loc, w = plugins[0].input
    elem = onnx.TensorProto.FLOAT if dtype == torch.float32 else onnx.TensorProto.FLOAT16
    N, Lq, M, D, L, P = "batch", 11, 3, 5, len(SHAPES), 4
    assert _dims(info[v]) == [N, S, M, D] and info[v].elem_type == elem
    assert consts[shapes].dtype == np.int32 and consts[shapes].tolist() == [list(s) for s in SHAPES]
    assert consts[starts].dtype == np.int32 and consts[starts].tolist() == [0, 63, 87]
    assert _dims(info[loc]) == [N, Lq, M, L, P, 2] and info[loc].elem_type == elem
    assert _dims(info[w]) == [N, Lq, M, L, P] and info[w].elem_type == elem
    out = info[plugins[0].output[0]]
    assert _dims(out) == [N, Lq, M, D] and out.elem_type == elem


class MSDAOption(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, value, loc, w):
        return rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, w, **self.options)


@pytest.mark.parametrize("options,dtype,match", [
    (dict(num_points_list=POINTS, method="discrete"), torch.float32, "method='discrete'"),
    (dict(num_points_list=POINTS), torch.float32, r"num_points_list=\[2, 3, 1\]"),
    (dict(num_points_list=[2, 2, 2]), torch.float64, "value dtype float64"),
])
def test_tensorrt_form_without_translation_fails_at_export(options, dtype, match):
    value, _, _, loc, w = _msda_inputs(1, 5, seed=7, dtype=dtype)
    if options["num_points_list"] == [2, 2, 2]:
        loc, w = loc[..., :6, :], w[..., :6]
    with pytest.raises(rk_onnx.UnsupportedExport, match=match) as info:
        rk_onnx.export(MSDAOption(**options).eval(), (value, loc, w), msda="tensorrt")
    assert str(info.value).startswith("msda='tensorrt': ")
    # the plain torch.onnx.export recipe fails at export time too, with the same words in its error
    with pytest.raises(Exception, match=match):
        torch.onnx.export(MSDAOption(**options).eval(), (value, loc, w), dynamo=True,
                          custom_translation_table=rk_onnx.translation_table(msda="tensorrt"))


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="msda: expected one of"):
        rk_onnx.translation_table(msda="grid")
    with pytest.raises(ValueError, match="attention: expected one of"):
        rk_onnx.translation_table(attention="flash")
    with pytest.raises(ValueError, match="mdsa: unknown export option"):
        rk_onnx.translation_table(mdsa="gather")
    with pytest.raises(ValueError, match="opset_version >= 23"):
        rk_onnx.export(MSDAv1(), _msda_inputs(1, 3, seed=1)[:3], attention="attention23", opset_version=18)


def test_translation_table_with_torch_onnx_export():
    """The plain recipe: torch.onnx.export with the table (no helper), static shapes."""
    inputs = _msda_inputs(2, 6, seed=8)[:3]
    program = torch.onnx.export(MSDAv1().eval(), inputs, dynamo=True,
                                custom_translation_table=rk_onnx.translation_table(msda="gather"))
    proto = _check_standard(program)
    (got,) = Runner("onnxruntime", proto).run(*inputs)
    _close(got, MSDAv1()(*(t.double() for t in inputs)), ATOL_OP)


# ----------------------------------------------------------------------------------------------
# attention alone
# ----------------------------------------------------------------------------------------------

E, HEADS, L = 24, 4, 13


class Attention(torch.nn.Module):
    def __init__(self, mask_kind: str):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.in_w = torch.nn.Parameter(torch.randn(3 * E, E, generator=g) / E ** 0.5)
        self.in_b = torch.nn.Parameter(torch.randn(3 * E, generator=g) * 0.5)
        self.out_w = torch.nn.Parameter(torch.randn(E, E, generator=g) / E ** 0.5)
        self.out_b = torch.nn.Parameter(torch.randn(E, generator=g) * 0.5)
        self.mask_kind = mask_kind

    def forward(self, x, pos, mask=None):
        return rtdetr_kernels.aifi_attention(x, pos, self.in_w, self.in_b, self.out_w, self.out_b, HEADS, mask)


def _attention_inputs(N, mask_kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, E, generator=g).to(dtype)
    pos = torch.randn(1, L, E, generator=g).to(dtype)
    if mask_kind == "none":
        return x, pos
    if mask_kind == "bool":  # [L, L], True = blocked; row 3 blocked everywhere
        mask = torch.rand(L, L, generator=g) > 0.6
        mask[3] = True
    else:  # additive, per (batch, head) [N * H, L, L]; one row of one head all -inf
        mask = torch.randn(N * HEADS, L, L, generator=g).to(dtype)
        mask[1, 5] = float("-inf")
        mask[0, 2, :4] = float("-inf")
    return x, pos, mask


@pytest.fixture(scope="module", params=[(f, m) for f in ("matmul", "attention23") for m in ("none", "bool", "float")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def attention_export(request):
    form, mask_kind = request.param
    inputs = _attention_inputs(2, mask_kind, seed=2)
    batch = torch.export.Dim("batch")
    dynamic = ({0: batch}, None) + (({0: torch.export.Dim("heads_batch")},) if mask_kind == "float" else
                                    (None,) if mask_kind == "bool" else ())
    program = rk_onnx.export(Attention(mask_kind).eval(), inputs, attention=form, dynamic_shapes=dynamic)
    return form, mask_kind, _check_standard(program)


def test_attention_graph_forms(attention_export):
    form, _, proto = attention_export
    ops = [t for _, t in _ops(proto)]
    assert ("Attention" in ops) == (form == "attention23")
    assert ("Softmax" in ops) == (form == "matmul")


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("N", [1, 2])
def test_attention_matches_op(attention_export, runtime, N):
    form, mask_kind, proto = attention_export
    inputs = _attention_inputs(N, mask_kind, seed=20 + N)
    module = Attention(mask_kind)
    want = module.double()(*(t.double() for t in inputs[:2]), *([inputs[2] if inputs[2].dtype == torch.bool else
                                                                 inputs[2].double()] if len(inputs) > 2 else []))
    (got,) = Runner(runtime, proto).run(*inputs)
    _close(got, want, ATOL_OP, what=f"{form} {mask_kind} {runtime}")


@pytest.fixture(scope="module")
def attention_fp16():
    module = Attention("bool").half().eval()
    inputs = _attention_inputs(2, "bool", seed=4, dtype=torch.float16)
    program = rk_onnx.export(module, inputs, dynamic_shapes=({0: torch.export.Dim("batch")}, None, None))
    return module, inputs, _check_standard(program)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_attention_fp16_export(attention_fp16, runtime):
    module, inputs, proto = attention_fp16
    want = module(*inputs)
    (got,) = Runner(runtime, proto).run(*inputs)
    assert got.dtype == np.float16
    _close(got, want, atol=1e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------------------
# top-K alone: exact order on distinct scores; ties as the ONNX spec defines them
# ----------------------------------------------------------------------------------------------

T, C, K = 57, 5, 9


class TopK(torch.nn.Module):
    def __init__(self, pairs: bool):
        super().__init__()
        self.pairs = pairs

    def forward(self, logits, memory, boxes):
        if self.pairs:
            scores, labels, queries, gathered = topk_select_flat(logits, K, (memory, boxes))
            return (scores, labels, queries) + gathered
        scores, indices, gathered = rtdetr_kernels.topk_select(logits, K, (memory, boxes))
        return (scores, indices) + gathered


def _topk_inputs(N, tokens, seed, ties=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many equal class maxima and equal (token, class) scores
        logits = torch.randint(0, 3, (N, tokens, C), generator=g).to(dtype)
    else:
        logits = torch.randn(N, tokens, C, generator=g).to(dtype)
    return logits, torch.randn(N, tokens, 7, generator=g), torch.rand(N, tokens, 4, generator=g)


@pytest.fixture(scope="module", params=[False, True], ids=["tokens", "pairs"])
def topk_export(request):
    pairs = request.param
    tokens = torch.export.Dim("tokens", min=K)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch, 1: tokens} for _ in range(3))
    program = rk_onnx.export(TopK(pairs).eval(), _topk_inputs(2, T, seed=0), dynamic_shapes=dynamic)
    proto = _check_standard(program)
    assert "TopK" in [t for _, t in _ops(proto)]
    return pairs, proto


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("N,tokens", [(1, T), (2, T), (2, 40)])
def test_topk_distinct_scores_exact(topk_export, runtime, N, tokens):
    pairs, proto = topk_export
    inputs = _topk_inputs(N, tokens, seed=30 + N + tokens)
    want = TopK(pairs)(*inputs)
    got = Runner(runtime, proto).run(*inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(_t(g, w), w)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_topk_ties(topk_export, runtime):
    """ONNX TopK breaks ties by the lower index (the spec), which is the op's order: ONNX Runtime gives
    exactly the op's output. OpenVINO 2026.4's CPU TopK does not keep that order on ties (measured); what
    holds there: the same multiset of scores in the same descending order, each returned index is a
    token (pair) with that score, and the gathered rows are those of the returned indices."""
    pairs, proto = topk_export
    logits, memory, boxes = _topk_inputs(2, T, seed=41, ties=True)
    want = TopK(pairs)(logits, memory, boxes)
    got = [_t(g) for g in Runner(runtime, proto).run(logits, memory, boxes)]
    if runtime == "onnxruntime":
        for g, w in zip(got, want):
            assert torch.equal(g.to(w.dtype), w)
        return
    scores = got[0]
    assert torch.equal(scores, want[0])
    if pairs:
        labels, queries = got[1], got[2]
        assert torch.equal(logits[torch.arange(2)[:, None], queries, labels], scores)
        idx, chosen = queries, queries * C + labels
    else:
        idx = chosen = got[1]
        assert torch.equal(logits.max(-1).values.gather(1, idx), scores)
    assert all(len(set(row.tolist())) == K for row in chosen)  # no candidate twice
    gathered = got[3:] if pairs else got[2:]
    for g, source in zip(gathered, (memory, boxes)):
        assert torch.equal(g, source.gather(1, idx.unsqueeze(-1).expand(-1, -1, source.shape[-1])))


# ----------------------------------------------------------------------------------------------
# patched models
# ----------------------------------------------------------------------------------------------


class Outputs(torch.nn.Module):
    """A detector's dict output as a tuple (logits, boxes)."""

    def __init__(self, model, keys=("pred_logits", "pred_boxes")):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x):
        out = self.model(x)
        return tuple(out[k] if isinstance(out, dict) else getattr(out, k) for k in self.keys)


def _our_model():
    from rtdetr.testing import randomize_
    from rtdetr_kernels.demo.model import build

    model = randomize_(build("tiny", num_classes=7), seed=0, score_scale=8.0).eval()
    handle = rtdetr_kernels.patch(model)
    kinds = {r.kind for r in handle.replaced}
    assert kinds == {"msda", "attention", "topk"}, handle.report()
    return Outputs(model).eval()


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    model = _our_model()
    images = torch.rand(2, 3, 96, 128)  # levels 12x16, 6x8, 3x4
    with torch.no_grad():
        want = model(images)
    return model, images, want


@pytest.fixture(scope="module")
def ours_program(ours):
    """torch.export once; each form below translates this ExportedProgram."""
    model, images, _ = ours
    return torch.export.export(model, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.fixture(scope="module")
def ours_grid_sample(ours, ours_program):
    _, images, _ = ours
    return _check_standard(rk_onnx.export(ours_program, (images,), msda="grid_sample"))


def _model_matches(proto, runtime, images, want):
    runner = Runner(runtime, proto)
    for b in (1, 2):
        got = runner.run(images[:b])
        for g, w in zip(got, want):
            _close(g, w[:b], atol=TOL_MODEL, rtol=TOL_MODEL, what=f"{runtime} batch {b}")


def test_ours_graph(ours_grid_sample):
    ops = [t for _, t in _ops(ours_grid_sample)]
    assert ops.count("GridSample") == 2 * 3  # 2 decoder layers x 3 levels
    assert ops.count("TopK") == 1  # query selection
    assert "Softmax" in ops


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_ours_matches_pytorch(ours, ours_grid_sample, runtime):
    _, images, want = ours
    _model_matches(ours_grid_sample, runtime, images, want)


def test_ours_gather_form_has_no_grid_sample(ours, ours_program):
    _, images, want = ours
    # optimize=False: the onnxscript optimizer is a fifth of a model's export time here; the form does not need it
    proto = _check_standard(rk_onnx.export(ours_program, (images,), msda="gather", optimize=False))
    assert "GridSample" not in [t for _, t in _ops(proto)]
    _model_matches(proto, "onnxruntime", images, want)


def test_ours_tensorrt_form(ours, ours_program):
    _, images, _ = ours
    proto = rk_onnx.export(ours_program, (images,), msda="tensorrt", optimize=False).model_proto
    onnx.checker.check_model(proto)
    ops = [(d, t) for d, t in _ops(proto)]
    assert ops.count(("trt", "MultiscaleDeformableAttnPlugin_TRT")) == 2
    assert ("", "GridSample") not in ops
    assert set(rk_onnx.custom_domains(proto)) == {("trt", "MultiscaleDeformableAttnPlugin_TRT")}


# ----------------------------------------------------------------------------------------------
# other families patched with rtdetr_kernels.patch: transformers' and ultralytics' RT-DETR
# ----------------------------------------------------------------------------------------------


def _transformers_model():
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                                  out_indices=[2, 3, 4], embedding_size=16)
    config = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32,
                          d_model=32, decoder_in_channels=[32, 32, 32], encoder_ffn_dim=64, decoder_ffn_dim=64,
                          decoder_layers=2, num_queries=20, num_labels=5, encoder_attention_heads=4,
                          decoder_attention_heads=4, num_denoising=0, anchor_image_size=[96, 128])
    model = RTDetrForObjectDetection(config).eval()
    with torch.no_grad():  # a stronger class head: no near-ties in the query selection
        model.model.enc_score_head.weight.mul_(8.0)
    return Outputs(model, keys=("logits", "pred_boxes")).eval()


@pytest.fixture(scope="module")
def transformers_rtdetr():
    """transformers' RT-DETR exported unpatched (torch.onnx's own translations) and patched (ours).

    transformers 5.x's RT-DETR fixes the batch size during export by itself (unpatched too), so both
    exports are for batch 2; and torch.onnx's translation of its code gives O(1) differences from PyTorch
    unpatched as well (its ExportedProgram matches eager exactly): the patched export is compared with the
    unpatched export, run by the same runtime, which isolates what the patch and our translations change."""
    pytest.importorskip("transformers")
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    unpatched = _transformers_model()
    reference = _check_standard(torch.onnx.export(unpatched, (images,), dynamo=True))
    patched = _transformers_model()
    handle = rtdetr_kernels.patch(patched.model)
    assert {r.kind for r in handle.replaced} >= {"msda", "attention"}, handle.report()
    with torch.no_grad():
        torch.testing.assert_close(patched(images), unpatched(images), atol=1e-5, rtol=1e-5)
    proto = _check_standard(rk_onnx.export(patched, (images,), dynamic_batch=False))
    return patched, images, reference, proto


def test_transformers_rtdetr_dynamic_batch_is_refused_clearly(transformers_rtdetr):
    patched, images, _, _ = transformers_rtdetr
    with pytest.raises(ValueError, match="dynamic_batch: the exported graph fixes the batch size of input .* at 2: "
                                         "the model's own code"):
        rk_onnx.export(patched, (images,))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_transformers_rtdetr_patched_export_matches_unpatched(transformers_rtdetr, runtime):
    _, images, reference, proto = transformers_rtdetr
    assert [t for _, t in _ops(proto)].count("GridSample") == 2 * 3  # 2 decoder layers x 3 levels
    want = Runner(runtime, reference).run(images)
    got = Runner(runtime, proto).run(images)
    for g, w in zip(got, want):
        _close(g, _t(w), atol=TOL_MODEL, rtol=TOL_MODEL, what=runtime)


@pytest.fixture(scope="module")
def ultralytics_rtdetr():
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics is a test dependency of the ultralytics family")
    import copy

    from test_patch_ultralytics import CFG, _import_ultralytics_quietly

    with _import_ultralytics_quietly() as tasks:
        torch.manual_seed(0)
        model = tasks.RTDETRDetectionModel(copy.deepcopy(CFG), ch=3, verbose=False)
    with torch.no_grad():  # upstream zero-initialises some heads: make every path input-dependent
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    handle = rtdetr_kernels.patch(model)
    assert "msda" in {r.kind for r in handle.replaced}, handle.report()

    class Detections(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[0]  # [N, queries, 4 + classes]

    wrapped = Detections(model).eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = wrapped(images)
    return images, want, _check_standard(rk_onnx.export(wrapped, (images,)))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_ultralytics_rtdetr_matches_pytorch(ultralytics_rtdetr, runtime):
    images, want, proto = ultralytics_rtdetr
    assert "GridSample" in [t for _, t in _ops(proto)]
    runner = Runner(runtime, proto)
    for b in (1, 2):
        (got,) = runner.run(images[:b])
        _close(got, want[:b], atol=TOL_MODEL, rtol=TOL_MODEL, what=f"{runtime} batch {b}")
