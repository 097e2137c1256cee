"""rtdetr_kernels.patch on rfdetr 1.11.2 (the ``rfdetr`` family).

A random RF-DETR Nano (``pretrain_weights=None``: nothing downloaded; 30 M parameters) at 128 px runs
patched and unpatched: eval outputs and the post-processor, a training step's loss (rfdetr's own
``SetCriterion``, 13 query groups) and every parameter gradient, state-dict keys, revert and patching
twice. The patched modules are also run alone where that is cheaper (MSDeformAttn's eager and export
layouts, the decoder layer's group split and dropout fallback, the post-processor's tie order), and the
MSDA op is checked on RF-DETR's shapes (one level, 16 heads of 16 channels, 2 points) on every
backend that runs here against the reference.

Cost (2 CPU cores, unloaded): building the model about 3 s, an eval forward about 1 s, a training
step (forward, criterion, backward) about 7 s, twice per run.

Tolerances: patched and unpatched compute the same float32 math in other summation orders. Outputs
differ by under 1e-6 (measured); gradients by under 3e-7 absolute where the largest gradient is 0.45,
so they are compared with atol = 1e-5 x the largest gradient (15x the measured error) and rtol 1e-3.
A parameter-wise relative test would be wrong here: some gradients are pure rounding noise (the
attention key biases of the backbone, to which softmax is invariant, get about 1e-9).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import warnings

import pytest
import torch

import rtdetr_kernels
from msda_oracle import SCALED_TOL, assert_close_scaled
from rtdetr_kernels import backends

if importlib.util.find_spec("rfdetr") is None:
    pytest.skip("rfdetr is a test dependency of the rfdetr family", allow_module_level=True)

RES = 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # of the op tests (the model tests run on the CPU)
OUT_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def rf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pretrain_weights=None and torch.jit.script deprecation warnings
        from rfdetr.config import RFDETRNanoConfig, TrainConfig
        from rfdetr.models.lwdetr import build_criterion_from_config, build_model_from_config

        logging.getLogger("rf-detr").setLevel(logging.ERROR)
        torch.manual_seed(0)
        cfg = RFDETRNanoConfig(pretrain_weights=None, num_classes=5, resolution=RES)
        model = build_model_from_config(cfg)
        criterion, post = build_criterion_from_config(cfg, TrainConfig(dataset_dir=".", output_dir="."))
    # the heads start from structured values (zeros, constants): perturb the non-backbone parameters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone"):
                p.add_(torch.randn_like(p) * 0.02)
    return model, criterion, post


class _Calls:
    """Counts calls of the upstream code a patch replaces (it must not run while patched)."""

    def __init__(self, monkeypatch):
        from rfdetr.models import postprocess, transformer
        from rfdetr.models.ops.modules import ms_deform_attn

        self.counts = {"msda": 0, "mha": 0, "select": 0, "group_selection": 0}

        def count(kind, fn):
            def wrapped(*a, **k):
                self.counts[kind] += 1
                return fn(*a, **k)
            return wrapped

        monkeypatch.setattr(ms_deform_attn, "ms_deform_attn_core_pytorch",
                            count("msda", ms_deform_attn.ms_deform_attn_core_pytorch))
        monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", count("mha", torch.nn.MultiheadAttention.forward))
        monkeypatch.setattr(postprocess.PostProcess, "_select_topk",
                            count("select", postprocess.PostProcess._select_topk))
        monkeypatch.setattr(transformer.Transformer, "_two_stage_group_selection",
                            count("group_selection", transformer.Transformer._two_stage_group_selection))

    def reset(self):
        self.counts = dict.fromkeys(self.counts, 0)


def _images(n=2, seed=1):
    from rfdetr.utilities.tensors import NestedTensor

    x = torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))
    return NestedTensor(x, torch.zeros(n, RES, RES, dtype=torch.bool))


def _targets(seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for count in (3, 1):
        xy = torch.rand(count, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(count, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, 5, (count,), generator=g), "boxes": torch.cat([xy, wh], 1)})
    return out


def _tensors(out, prefix=""):
    """Every tensor of a (nested) output dict, by key."""
    flat = {}
    items = out.items() if isinstance(out, dict) else enumerate(out)
    for k, v in items:
        if torch.is_tensor(v):
            flat[f"{prefix}{k}"] = v
        elif isinstance(v, (dict, list, tuple)):
            flat.update(_tensors(v, f"{prefix}{k}."))
    return flat


def _eval(model, post, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
        results = post(out, torch.tensor([[RES, RES + 32]] * x.tensors.shape[0]))
    return _tensors(out), results


def _train_step(model, criterion, x, targets):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    losses = criterion(out, targets)
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", [None, "reference"])
def test_eval_parity_and_revert(rf, backend, monkeypatch):
    base, _, post_base = rf
    model, post = copy.deepcopy(base), copy.deepcopy(post_base)
    calls = _Calls(monkeypatch)
    x = _images()
    keys = list(model.state_dict())
    ref_out, ref_res = _eval(model, post, x)
    assert calls.counts == {"msda": 2, "mha": 2, "select": 1, "group_selection": 0}

    handle = rtdetr_kernels.patch(model, backend=backend)
    post_handle = rtdetr_kernels.patch(post, backend=backend)
    assert handle.counts() == {"msda": {"MSDeformAttn": 2}, "attention": {"TransformerDecoderLayer": 2},
                               "topk": {"Transformer": 1}}
    assert post_handle.counts() == {"topk": {"PostProcess": 1}}
    assert "MSDeformAttn" in handle.report() and "group split kept" in handle.report()
    assert list(model.state_dict()) == keys
    assert rtdetr_kernels.patch(model) is handle

    calls.reset()
    out, res = _eval(model, post, x)
    assert calls.counts == dict.fromkeys(calls.counts, 0)
    assert out.keys() == ref_out.keys() and "pred_logits" in out
    for k in out:
        torch.testing.assert_close(out[k], ref_out[k], **OUT_TOL, msg=lambda s: f"{k}: {s}")
    for r, rr in zip(res, ref_res):
        assert torch.equal(r["labels"], rr["labels"])  # same (query, class) pairs in the same order
        torch.testing.assert_close(r["scores"], rr["scores"], **OUT_TOL)
        torch.testing.assert_close(r["boxes"], rr["boxes"], atol=1e-3, rtol=1e-5)  # pixels

    handle.revert()
    post_handle.revert()
    assert not any(a in m.__dict__ for m in model.modules() for a in ("forward", "forward_post", "_two_stage_group_selection"))
    assert "_select_topk" not in post.__dict__
    again, again_res = _eval(model, post, x)
    assert calls.counts["msda"] == 2 and calls.counts["select"] == 1
    assert all(torch.equal(again[k], ref_out[k]) for k in ref_out)


def test_training_step_loss_and_gradients(rf, monkeypatch):
    base, criterion, _ = rf
    model = copy.deepcopy(base)
    calls = _Calls(monkeypatch)
    x, targets = _images(seed=3), _targets(seed=4)
    loss_ref, grads_ref = _train_step(model, criterion, x, targets)
    assert calls.counts["group_selection"] == 1 and calls.counts["mha"] == 2
    handle = rtdetr_kernels.patch(model)
    calls.reset()
    loss, grads = _train_step(model, criterion, x, targets)
    assert calls.counts == dict.fromkeys(calls.counts, 0)  # the group selection and attention ran patched
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) >= len(list(model.parameters())) - 1  # all but one unused parameter get a gradient
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], atol=1e-5 * scale, rtol=1e-3, msg=lambda s: f"{name}: {s}")
    handle.revert()


def test_two_stage_group_selection_alone(rf):
    base, _, _ = rf
    transformer = copy.deepcopy(base.transformer).train()
    memory = torch.randn(2, 77, transformer.d_model)
    proposals = torch.rand(2, 77, 4)
    ref = transformer._two_stage_group_selection(memory, proposals, transformer.group_detr)
    handle = rtdetr_kernels.patch(transformer, msda=False, attention=False)
    assert handle.counts() == {"topk": {"Transformer": 1}}
    out = transformer._two_stage_group_selection(memory, proposals, transformer.group_detr)
    assert len(out) == 4
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **OUT_TOL)


def _layer(group_detr=3, dropout=0.0, seed=5):
    from rfdetr.models.transformer import TransformerDecoderLayer

    torch.manual_seed(seed)
    layer = TransformerDecoderLayer(64, 4, 4, dim_feedforward=96, dropout=dropout, group_detr=group_detr,
                                    num_feature_levels=2, dec_n_points=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return layer


def _layer_inputs(layer, nq=3 * 7, seed=6):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (3, 3)]
    S = sum(h * w for h, w in shapes)
    return dict(tgt=torch.randn(2, nq, 64, generator=g), memory=torch.randn(2, S, 64, generator=g),
                query_pos=torch.randn(2, nq, 64, generator=g),
                reference_points=torch.rand(2, nq, 2, 4, generator=g) * 0.8 + 0.1,
                spatial_shapes=torch.tensor(shapes), spatial_shapes_hw=shapes,
                level_start_index=torch.tensor([0, 30]))


@pytest.mark.parametrize("training", [False, True])
def test_decoder_layer_group_split(training, monkeypatch):
    calls = _Calls(monkeypatch)
    layer = _layer().train(training)
    inputs = _layer_inputs(layer)
    ref = layer(**inputs)
    handle = rtdetr_kernels.patch(layer)
    assert handle.counts() == {"msda": {"MSDeformAttn": 1}, "attention": {"TransformerDecoderLayer": 1}}
    calls.reset()
    leaves = {k: v.clone().requires_grad_() if k in ("tgt", "memory", "query_pos") else v for k, v in inputs.items()}
    out = layer(**leaves)
    assert calls.counts["mha"] == 0 and calls.counts["msda"] == 0
    torch.testing.assert_close(out, ref, **OUT_TOL)
    # the groups attend separately in training: a change in group 0's queries leaves group 2's outputs alone
    moved = dict(inputs, tgt=inputs["tgt"].clone())
    moved["tgt"][:, :7] += 1.0
    delta = (layer(**moved) - out).abs().amax(dim=(0, 2))
    assert (delta[14:].max() == 0) == training and delta[:7].min() > 0


def test_decoder_layer_dropout_falls_back(monkeypatch):
    calls = _Calls(monkeypatch)
    layer = _layer(dropout=0.1).train()
    inputs = _layer_inputs(layer)
    rtdetr_kernels.patch(layer)
    torch.manual_seed(7)
    out = layer(**inputs)
    assert calls.counts["mha"] == 1  # upstream's attention (with its dropout) ran
    torch.manual_seed(7)
    assert torch.equal(out, layer.__class__.forward_post(layer, **inputs))
    calls.reset()
    layer.eval()(**inputs)
    assert calls.counts["mha"] == 0


@pytest.mark.parametrize("export", [False, True], ids=["eager", "export"])
@pytest.mark.parametrize("ref_dims,ref_levels", [(2, 2), (4, 1), (4, 2)])
@pytest.mark.parametrize("hw", [True, False], ids=["hw-list", "shapes-tensor"])
def test_msdeformattn_layouts(export, ref_dims, ref_levels, hw):
    from rfdetr.models.ops.modules import MSDeformAttn

    if not export and ref_levels == 1 and ref_dims == 2:
        pytest.skip("not a case upstream builds")
    torch.manual_seed(8)
    attn = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=3)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if export:
        attn.export()
    shapes = [(7, 9), (4, 5)]
    S = sum(h * w for h, w in shapes)
    query = torch.randn(2, 13, 64)
    value = torch.randn(2, S, 64)
    refs = torch.rand(2, 13, ref_levels, ref_dims) * 0.8 + 0.1
    mask = torch.rand(2, S) < 0.2
    args = (query, refs, value, torch.tensor(shapes), torch.tensor([0, 63]), mask)
    kwargs = {"input_spatial_shapes_hw": shapes if (hw or export) else None}
    ref = attn(*args, **kwargs)
    handle = rtdetr_kernels.patch(attn)
    assert handle.counts() == {"msda": {"MSDeformAttn": 1}}
    torch.testing.assert_close(attn(*args, **kwargs), ref, **OUT_TOL)
    if export:
        with pytest.raises(ValueError, match="input_spatial_shapes_hw"):  # upstream's error, from the original
            attn(*args)


def test_select_topk_tie_order_and_limits(rf):
    from rfdetr.models.postprocess import PostProcess

    g = torch.Generator().manual_seed(9)
    # ties: fp32 sigmoid is exactly 1.0 above a logit of about 17, and rounded logits repeat
    logits = torch.cat([torch.randn(2, 40, 6, generator=g).round(decimals=1),
                        torch.full((2, 5, 6), 30.0) + torch.rand(2, 5, 6, generator=g)], 1)
    for num_select in (7, 100, 45 * 6, 1000, 0):
        post = PostProcess(num_select=num_select)
        ref = post._select_topk(logits)
        rtdetr_kernels.patch(post)
        out = post._select_topk(logits)
        for a, b in zip(out, ref):
            assert torch.equal(a, b), num_select


def _msda_case(N, Lq, shapes, M=16, D=16, P=2, seed=10):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.1 - 0.05
    weights = torch.randn(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P)
    return value, loc, weights


def _available(backend):
    return backends.why_not(backend, backends.Call("ms_deform_attn", DEVICE, (torch.float32,) * 3)) is None


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton", "reference"])
@pytest.mark.parametrize("N,Lq,shapes", [(2, 300, [(24, 24)]), (1, 3900, [(12, 12)]), (3, 37, [(11, 13)]),
                                         (1, 6, [(24, 24)])],
                         ids=["nano-eval", "training-groups", "odd", "nano-few-queries"])
def test_msda_op_on_rfdetr_shapes(backend, N, Lq, shapes):
    """One level, 16 heads of 16 channels, 2 points: forward and the three gradients against the
    float64 reference on the same (float32-rounded) inputs, within the MSDA suite's float32 bound
    (2e-5 x the largest magnitude: msda_oracle.SCALED_TOL)."""
    if not _available(backend):
        pytest.skip(f"{backend} does not run here")
    if backend == "triton" and DEVICE == "cpu" and Lq * N > 8:
        pytest.skip("the Triton interpreter takes about 1 s per query here (nano-few-queries covers it)")
    value, loc, weights = (t.to(DEVICE) for t in _msda_case(N, Lq, shapes))
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = rtdetr_kernels.ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2], backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.double().requires_grad_() for t in (value, loc, weights)]
    ref = rtdetr_kernels.ms_deform_attn(ref_leaves[0], shapes, ref_leaves[1], ref_leaves[2], backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    tol = SCALED_TOL[torch.float32]
    assert_close_scaled(out.detach(), ref.detach(), tol, f"{backend} output")
    for name, a, b in zip(("value", "locations", "weights"), grads, ref_grads):
        assert_close_scaled(a, b, tol, f"{backend} grad_{name}")


def test_rfdetr_object_patches_network_and_postprocess(monkeypatch):
    """``patch(RFDETRNano(...))``: the network and the post-processor together; ``predict`` end to end."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from rfdetr import RFDETRNano

        torch.manual_seed(11)
        rf = RFDETRNano(pretrain_weights=None, num_classes=5, resolution=RES)
    with torch.no_grad():
        for name, p in rf.model.model.named_parameters():
            if not name.startswith("backbone"):
                p.add_(torch.randn_like(p) * 0.02)
    image = (np.random.default_rng(12).random((RES + 17, RES - 9, 3)) * 255).astype(np.uint8)
    ref = rf.predict(image, threshold=0.0)
    calls = _Calls(monkeypatch)
    handle = rtdetr_kernels.patch(rf)
    assert handle.counts() == {"msda": {"MSDeformAttn": 2}, "attention": {"TransformerDecoderLayer": 2},
                               "topk": {"PostProcess": 1, "Transformer": 1}}
    assert rtdetr_kernels.patch(rf) is handle
    out = rf.predict(image, threshold=0.0)
    assert calls.counts == dict.fromkeys(calls.counts, 0)
    assert len(out) == len(ref) > 0
    np.testing.assert_array_equal(out.class_id, ref.class_id)
    np.testing.assert_allclose(out.confidence, ref.confidence, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out.xyxy, ref.xyxy, atol=1e-3, rtol=1e-5)  # pixels
    handle.revert()
    assert "_select_topk" not in rf.model.postprocess.__dict__
    with pytest.raises(TypeError, match="nn.Module"):
        rtdetr_kernels.patch(object())
