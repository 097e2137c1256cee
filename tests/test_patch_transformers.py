"""rtdetr_kernels.patch on transformers' DETR models (the ``transformers`` family).

Tiny random models from the research note's offline recipes (in-library backbones, no download,
``HF_HUB_OFFLINE=1``), 96 x 160 px so that the levels are not square and the smallest odd (12 x 20, 6 x 10, 3 x 5;
the FPN needs sides divisible by 32):
RTDetr (also with ``eval_size``, where eval passes no position embedding), RTDetrV2 (default and
discrete sampling), DFine (non-uniform ``decoder_n_points`` [3, 6, 3], default and discrete) and
DeformableDetr (two-stage off and on). For each: patched vs unpatched eval outputs, a training step's
loss (with labels: denoising on) and every parameter gradient, the replaced classes and the op calls,
state-dict keys and values, revert, patching twice, copies and pickles. Then the traps (per-axis
discrete clamp, D-FINE's positional ``method``, RT-DETRv2's ``n_points_scale`` and host sync), the
attention fallbacks and weight cache, every class the family matches by name, the post-processors,
the ``kernels`` package path and the whole-model capture.

Tolerances: patched and unpatched run the same float32 math in other summation orders (the MSDA
kernel, SDPA inside the fused attention); measured here, eval outputs differ by at most 6e-7 (logits up
to 6; the reference backend's figure, the auto backend's 2.4e-7), a training step's loss not at all and
its gradients by at most 1e-5 of each tensor's largest (D-FINE's chaotic encoder aside: see its test).
1e-4 leaves room for another CPU's vector width without hiding a wrong index, a dropped term or a lost
gradient (those change outputs at the 1e-2 level). Figures per model: docs/integrations.md.

transformers 5.17.0 (CI's second lane) has every class used here but ``PPDocLayoutV4*`` (added later):
those cases skip by name where the class is missing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import importlib.util
import io
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import rtdetr_kernels

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")  # the detection losses' Hungarian matcher

from rtdetr_kernels.integrations import transformers as tf_family  # noqa: E402

RTOL = ATOL = 1e-4
H_IMG, W_IMG = 96, 160
NUM_LABELS = 5


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

_RTDETR_COMMON = dict(encoder_in_channels=[32, 64, 128], encoder_hidden_dim=64, encoder_ffn_dim=128, d_model=64,
                      decoder_in_channels=[64, 64, 64], decoder_ffn_dim=128, decoder_layers=2, num_queries=40,
                      num_labels=NUM_LABELS, encoder_attention_heads=4, decoder_attention_heads=4)


def _resnet_backbone():
    return transformers.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                           layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def _rtdetr(**kw):
    return transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(backbone_config=_resnet_backbone(),
                                                                          **{**_RTDETR_COMMON, **kw}))


def _rtdetr_v2(**kw):
    return transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(backbone_config=_resnet_backbone(),
                                                                              **{**_RTDETR_COMMON, **kw}))


def _dfine(**kw):
    hg = transformers.HGNetV2Config(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1],
                                    stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 96],
                                    stage_mid_channels=[16, 16, 32, 32], stage_out_channels=[32, 64, 96, 128],
                                    stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2],
                                    out_features=["stage2", "stage3", "stage4"])
    cfg = {**_RTDETR_COMMON, "encoder_in_channels": [64, 96, 128], "decoder_n_points": [3, 6, 3], **kw}
    return transformers.DFineForObjectDetection(transformers.DFineConfig(backbone_config=hg, **cfg))


def _deformable(**kw):
    bb = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                   layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cfg = dict(backbone_config=bb, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128,
               decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4, num_queries=30,
               num_labels=NUM_LABELS, num_feature_levels=4, dropout=0.0, two_stage_num_proposals=30)
    model = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**{**cfg, **kw}))
    # Deformable-DETR's init zeroes the offset weights and sets integer grid offsets: every encoder sample
    # then sits exactly on a pixel centre, a kink of bilinear sampling, where the location gradient is
    # one-sided and the side depends on rounding (see test_msda_location_gradient_on_pixel_centres).
    # Small random weights move the samples off the kinks.
    for m in model.modules():
        if type(m).__name__ == "DeformableDetrMultiscaleDeformableAttention":
            torch.nn.init.normal_(m.sampling_offsets.weight, std=0.02)
    return model


# recipe -> (builder, the replacements patch() reports, {op: calls per eval forward})
_ATT = {"attention": {"RTDetrSelfAttention": 3, "RTDetrEncoderLayer": 1}}
RECIPES = {
    "rtdetr": (_rtdetr, {"msda": {"MultiScaleDeformableAttention": 2}, **_ATT},
               {"ms_deform_attn": 2, "aifi_attention": 3}),
    "rtdetr-eval_size": (lambda: _rtdetr(eval_size=H_IMG), {"msda": {"MultiScaleDeformableAttention": 2}, **_ATT},
                         {"ms_deform_attn": 2, "aifi_attention": 3}),
    "rtdetr_v2": (_rtdetr_v2, {"msda": {"RTDetrV2MultiscaleDeformableAttention": 2},
                               "attention": {"RTDetrV2SelfAttention": 3, "RTDetrV2EncoderLayer": 1}},
                  {"ms_deform_attn": 2, "aifi_attention": 3}),
    "rtdetr_v2-discrete": (lambda: _rtdetr_v2(decoder_method="discrete"),
                           {"msda": {"RTDetrV2MultiscaleDeformableAttention": 2},
                            "attention": {"RTDetrV2SelfAttention": 3, "RTDetrV2EncoderLayer": 1}},
                           {"ms_deform_attn": 2, "aifi_attention": 3}),
    "dfine": (_dfine, {"msda": {"DFineMultiscaleDeformableAttention": 2},
                       "attention": {"DFineSelfAttention": 3, "DFineEncoderLayer": 1}},
              {"ms_deform_attn": 2, "aifi_attention": 3}),
    "dfine-discrete": (lambda: _dfine(decoder_method="discrete"), {"msda": {"DFineMultiscaleDeformableAttention": 2},
                                                                  "attention": {"DFineSelfAttention": 3, "DFineEncoderLayer": 1}},
                       {"ms_deform_attn": 2, "aifi_attention": 3}),
    # encoder (Lq = S) and decoder MSDA, decoder self-attention
    "deformable_detr": (_deformable, {"msda": {"MultiScaleDeformableAttention": 4},
                                      "attention": {"DeformableDetrSelfAttention": 2}},
                        {"ms_deform_attn": 4, "aifi_attention": 2}),
    "deformable_detr-two_stage": (lambda: _deformable(two_stage=True, with_box_refine=True),
                                  {"msda": {"MultiScaleDeformableAttention": 4},
                                   "attention": {"DeformableDetrSelfAttention": 2}},
                                  {"ms_deform_attn": 4, "aifi_attention": 2}),
}
TRAIN_RECIPES = ["rtdetr", "rtdetr_v2", "rtdetr_v2-discrete", "dfine", "deformable_detr-two_stage"]


def _build(recipe: str, seed: int = 0):
    torch.manual_seed(seed)
    return RECIPES[recipe][0]()


def _images(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, H_IMG, W_IMG, generator=g)


def _labels(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (3, 2):  # unequal counts: the denoising groups pad
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"class_labels": torch.randint(0, NUM_LABELS, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return out


@contextlib.contextmanager
def _spy(monkeypatch):
    """Record the public ops' calls made by patched code (it looks them up on ``rtdetr_kernels`` per call)."""
    calls = collections.defaultdict(list)
    for name in ("ms_deform_attn", "aifi_attention"):
        original = getattr(rtdetr_kernels, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(rtdetr_kernels, name, wrapper)
    import rtdetr_kernels.topk as topk_mod

    original_flat = topk_mod.topk_select_flat

    def flat(*args, **kwargs):
        calls["topk_select_flat"].append((args, kwargs))
        return original_flat(*args, **kwargs)

    monkeypatch.setattr(topk_mod, "topk_select_flat", flat)
    yield calls


def _match_rows(a: torch.Tensor, b: torch.Tensor, what: str):
    """Every query row of ``a`` [N, Q, F] has a row of ``b`` within the tolerance and vice versa
    (patched outputs may come in another query order where the encoder's scores nearly tie)."""
    assert a.shape == b.shape, what
    scale = float(b.abs().max()) + 1e-12
    for x, y in zip(a, b):
        d = torch.cdist(x.double(), y.double(), p=float("inf"))
        assert float(d.min(1).values.max()) <= ATOL * scale, f"{what}: a row of the patched output has no match"
        assert float(d.min(0).values.max()) <= ATOL * scale, f"{what}: a row of the unpatched output has no match"


def _assert_grads_close(grads: dict, ref_grads: dict, noise: dict = None):
    """Every gradient within RTOL, and ATOL of its tensor's largest reference gradient. Some gradients are
    zero in exact arithmetic (a key projection's bias shifts every score of a softmax row alike, a bias
    right before a normalisation changes nothing): both runs hold rounding noise there, so the absolute
    tolerance has a floor of ATOL * 1e-3 of the model's largest gradient."""
    grads = {n: g.grad if isinstance(g, torch.nn.Parameter) else g for n, g in grads.items()}
    ref_grads = {n: g.grad if isinstance(g, torch.nn.Parameter) else g for n, g in ref_grads.items()}
    top = max(float(g.abs().max()) for g in ref_grads.values() if g is not None)
    assert top > 0
    for name, g in grads.items():
        r = ref_grads[name]
        assert (g is None) == (r is None), name
        if g is None:
            continue
        atol = ATOL * max(float(r.abs().max()), 1e-3 * top)
        if noise is not None:  # the model's own rounding noise on this tensor (see the training test)
            atol += 4 * float((noise[name] - r).abs().max())
        torch.testing.assert_close(g, r, rtol=RTOL, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_outputs_close(out, ref, what: str):
    _match_rows(torch.cat([out.logits, out.pred_boxes], -1), torch.cat([ref.logits, ref.pred_boxes], -1), what)


# --------------------------------------------------------------------------------------------
# Per model: eval parity, replacements, op calls, state dict, revert, twice
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_eval_parity_and_handle(recipe, monkeypatch):
    model = _build(recipe).eval()
    x = _images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    with torch.no_grad():
        ref = model(pixel_values=x)

    handle = rtdetr_kernels.patch(model)
    assert handle.counts() == RECIPES[recipe][1]
    report = handle.report()
    for kind, classes in RECIPES[recipe][1].items():
        for cls, n in classes.items():
            assert f"{kind}: {n} x {cls}" in report
    assert "topk: nothing to patch" in report
    assert rtdetr_kernels.patch(model) is handle  # twice: a no-op
    assert handle.counts() == RECIPES[recipe][1]

    with _spy(monkeypatch) as calls, torch.no_grad():
        out = model(pixel_values=x)
    assert {k: len(v) for k, v in calls.items() if v} == RECIPES[recipe][2]
    _assert_outputs_close(out, ref, recipe)
    if recipe == "rtdetr-eval_size":  # eval with eval_size: the AIFI layer passes pos=None
        assert any(args[1] is None for args, _ in calls["aifi_attention"])
    if recipe.endswith("discrete"):
        assert all(kw.get("method") == "discrete" and kw.get("discrete_clamp") == "per_axis"
                   for _, kw in calls["ms_deform_attn"])

    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [id(p) for p in model.parameters()] == params

    handle.revert()
    assert handle.counts() == {}
    for _, m in model.named_modules():
        assert "forward" not in m.__dict__, type(m).__name__
        if hasattr(m, "ms_deformable_attn_core"):
            assert "ms_deformable_attn_core" not in m.__dict__ or not hasattr(m.ms_deformable_attn_core, "fn")
    with _spy(monkeypatch) as calls, torch.no_grad():
        back = model(pixel_values=x)
    assert not any(calls.values())
    assert torch.equal(back.logits, ref.logits) and torch.equal(back.pred_boxes, ref.pred_boxes)
    again = rtdetr_kernels.patch(model)  # patchable again after revert
    assert again is not handle and again.counts() == RECIPES[recipe][1]
    again.revert()


def test_pinned_reference_backend(monkeypatch):
    model = _build("rtdetr").eval()
    x = _images()
    with torch.no_grad():
        ref = model(pixel_values=x)
    handle = rtdetr_kernels.patch(model, backend="reference")
    with _spy(monkeypatch) as calls, torch.no_grad():
        out = model(pixel_values=x)
    assert calls["ms_deform_attn"] and calls["aifi_attention"]
    assert all(kw.get("backend") == "reference" for c in calls.values() for _, kw in c)
    _assert_outputs_close(out, ref, "rtdetr, backend='reference'")
    assert "backend 'reference'" in handle.report()
    handle.revert()


def test_kinds_and_nothing_to_patch():
    model = _build("rtdetr_v2")
    h = rtdetr_kernels.patch(model, attention=False)
    assert h.counts() == {"msda": {"RTDetrV2MultiscaleDeformableAttention": 2}}
    h.revert()
    with pytest.raises(ValueError, match="transformers"):
        rtdetr_kernels.patch(model, msda=False, attention=False)  # the query selection is not patched


def _train_step(model, x, labels):
    torch.manual_seed(7)  # the denoising groups draw noise
    out = model(pixel_values=x, labels=labels)
    out.loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("recipe", TRAIN_RECIPES)
def test_training_step_loss_and_every_gradient(recipe, monkeypatch):
    """One training step with labels (denoising on), patched vs unpatched: the loss and every gradient.

    D-FINE's tiny random model is ill-conditioned in training: its encoder's largest gradients reach 3e7
    and two unpatched runs that are equal in exact arithmetic (sdpa vs eager attention) differ by up to
    twice a tensor's largest value on some. There each tolerance adds 4x that measured difference (the
    patched run's, measured, stays within 1.2x of it); the decoder's gradients are tight either way."""
    ref_model = _build(recipe).train()
    model = copy.deepcopy(ref_model)
    x, labels = _images(), _labels()
    ref_loss, ref_grads = _train_step(ref_model, x, labels)
    noise = None
    if recipe.startswith("dfine"):
        eager = copy.deepcopy(ref_model)
        eager.set_attn_implementation("eager")
        noise = _train_step(eager, x, labels)[1]
    rtdetr_kernels.patch(model)
    with _spy(monkeypatch) as calls:
        loss, grads = _train_step(model, x, labels)
    assert calls["ms_deform_attn"] and calls["aifi_attention"]
    if not recipe.startswith("deformable"):  # the decoder's denoising mask: float [T, T] with -inf, served
        masks = [a[7] for a, _ in calls["aifi_attention"] if a[7] is not None]
        assert masks and all(m.dtype == torch.float32 and m.dim() == 2 and torch.isinf(m).any() for m in masks)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in ref_grads.items() if g is None]
    _assert_grads_close(grads, ref_grads, noise)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the packed weights carried the gradient back
        assert any(proj in n and g is not None and g.abs().max() > 0 for n, g in grads.items()), proj


def test_deepcopy_and_pickle():
    model = _build("rtdetr_v2").eval()
    x = _images(1)
    with torch.no_grad():
        ref = model(pixel_values=x)
    handle = rtdetr_kernels.patch(model)
    twin = copy.deepcopy(model)  # patched the same way, bound to the copy
    for (n, m), (_, t) in zip(model.named_modules(), twin.named_modules()):
        if "forward" in m.__dict__:
            assert t.__dict__["forward"].obj is t, n
    with torch.no_grad():
        _assert_outputs_close(twin(pixel_values=x), ref, "deepcopy")
    buf = io.BytesIO()
    torch.save(model, buf)  # the pickle holds the original methods, not the patch
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert not any(getattr(m.__dict__.get("forward"), "_rtdetr_kernels_patched", False) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, ref.logits)
    handle.revert()


# --------------------------------------------------------------------------------------------
# MSDA traps
# --------------------------------------------------------------------------------------------


def _v2_inputs(shapes, points, N=2, Lq=7, M=4, D=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Lq, M, sum(points), 2, generator=g) * 1.4 - 0.2  # outside [0, 1] too: the clamps matter
    w = torch.softmax(torch.randn(N, Lq, M, sum(points), generator=g), -1)
    return value, loc, w


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_dfine_core_method_positional_per_axis_clamp(method):
    from transformers.models.d_fine import modeling_d_fine

    model = _build("dfine")
    attn = model.model.decoder.layers[0].encoder_attn
    assert attn.num_points_list == [3, 6, 3] and attn.decoder_method == "default"
    assert attn.ms_deformable_attn_core is modeling_d_fine.multi_scale_deformable_attention_v2
    shapes = [(5, 9), (3, 4), (2, 7)]  # H != W: per-axis and upstream-official clamps differ
    value, loc, w = _v2_inputs(shapes, [3, 6, 3])
    ref = modeling_d_fine.multi_scale_deformable_attention_v2(value, shapes, loc, w, [3, 6, 3], method)
    handle = rtdetr_kernels.patch(model, attention=False)
    out = attn.ms_deformable_attn_core(value, shapes, loc, w, [3, 6, 3], method)  # positional, as forward calls it
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if method == "discrete":
        official = rtdetr_kernels.ms_deform_attn(value, shapes, loc, w, num_points_list=[3, 6, 3], method="discrete",
                                                 discrete_clamp="official")
        assert (official - ref).abs().max() > 1e-3  # the trap: transformers' port clamps per axis
    handle.revert()
    assert attn.ms_deformable_attn_core is modeling_d_fine.multi_scale_deformable_attention_v2


def test_rtdetr_v2_buffer_and_no_host_sync(monkeypatch):
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2

    model = _build("rtdetr_v2-discrete").eval()
    attn = model.model.decoder.layers[0].encoder_attn
    assert "n_points_scale" in dict(attn.named_buffers()) and not hasattr(attn, "num_points_scale")
    checks = []
    original = modeling_rt_detr_v2.torch_compilable_check
    monkeypatch.setattr(modeling_rt_detr_v2, "torch_compilable_check",
                        lambda cond, *a, **k: (checks.append(isinstance(cond, torch.Tensor)), original(cond, *a, **k)))
    x = _images(1)
    with torch.no_grad():
        model(pixel_values=x)
    assert checks == [True, True]  # upstream: one check on a device tensor (a host sync) per decoder layer
    checks.clear()
    handle = rtdetr_kernels.patch(model)
    with torch.no_grad():
        model(pixel_values=x)
    assert checks == []  # the patched forward checks Python ints
    with pytest.raises(ValueError, match="spatial shapes"):
        attn(torch.randn(1, 5, 64), encoder_hidden_states=torch.randn(1, 20, 64), reference_points=torch.rand(1, 5, 1, 4),
             spatial_shapes=torch.tensor([[3, 4], [2, 3], [1, 1]]), spatial_shapes_list=[(3, 4), (2, 3), (1, 1)])
    handle.revert()


@pytest.mark.xfail(strict=True, reason="the MSDA kernels compute x = loc * W - 0.5, grid_sample ((2 * loc - 1 + 1) * W - 1) / 2; "
                   "on a pixel centre (Deformable-DETR's initial encoder samples) the two round to different sides "
                   "for some samples, and there bilinear sampling's location gradient is one-sided")
def test_msda_location_gradient_on_pixel_centres():
    """Deformable-DETR's initial encoder sampling (pixel centres plus integer offsets): values agree,
    location gradients differ where the coordinate rounds to the other side of the kink."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention as HF

    g = torch.Generator().manual_seed(12)
    shapes = [(6, 10), (3, 5)]
    S, N, M, D, L, P = sum(h * w for h, w in shapes), 1, 2, 4, 2, 2
    H, W = shapes[0]
    ys, xs = torch.meshgrid(torch.linspace(0.5, H - 0.5, H), torch.linspace(0.5, W - 0.5, W), indexing="ij")
    ref_points = torch.stack([xs.reshape(-1) / W, ys.reshape(-1) / H], -1)
    Lq = ref_points.shape[0]
    offsets = torch.randint(-2, 3, (N, Lq, M, L, P, 2), generator=g).float()
    norm = torch.tensor([[w, h] for h, w in shapes]).float()
    loc = (ref_points[None, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]).requires_grad_(True)
    value = torch.randn(N, S, M, D, generator=g)
    weights = torch.softmax(torch.randn(N, Lq, M, L * P, generator=g), -1).view(N, Lq, M, L, P)
    grad = torch.randn(N, Lq, M * D, generator=g)
    ref = HF()(value, torch.tensor(shapes), shapes, None, loc, weights, 64)
    out = rtdetr_kernels.ms_deform_attn(value, shapes, loc, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (g_ref,) = torch.autograd.grad(ref, loc, grad)
    (g_out,) = torch.autograd.grad(out, loc, grad)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))


def _module(mod: str, cls: str):
    try:
        m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no models.{mod}")
    if not hasattr(m, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls} in models.{mod}")
    return m, getattr(m, cls)


HUB_COPIES = ["deformable_detr", "rt_detr", "grounding_dino", "mm_grounding_dino", "omdet_turbo", "lw_detr", "rf_detr",
              "pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4"]


@pytest.mark.parametrize("mod", HUB_COPIES)
def test_every_hub_msda_copy(mod):
    _, cls = _module(mod, "MultiScaleDeformableAttention")
    holder = torch.nn.Sequential(cls())
    g = torch.Generator().manual_seed(4)
    shapes = [(7, 5), (4, 3), (2, 2)]
    S = sum(h * w for h, w in shapes)
    N, M, D, L, P = 2, 4, 8, 3, 2
    for Lq in (6, S):  # decoder queries, and the Deformable-DETR encoder's Lq = S
        value = torch.randn(N, S, M, D, generator=g)
        loc = torch.rand(N, Lq, M, L, P, 2, generator=g)
        w = torch.softmax(torch.randn(N, Lq, M, L * P, generator=g), -1).view(N, Lq, M, L, P)
        st = torch.tensor(shapes)
        lsi = torch.cat([st.new_zeros(1), st.prod(1).cumsum(0)[:-1]])
        ref = holder[0](value, st, shapes, lsi, loc, w, 64)
        handle = rtdetr_kernels.patch(holder, attention=False)
        assert handle.counts() == {"msda": {"MultiScaleDeformableAttention": 1}}
        out = holder[0](value, st, shapes, lsi, loc, w, 64)
        handle.revert()
        assert out.shape == (N, Lq, M * D) and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Attention: every matched class, masks, fallbacks, the weight cache
# --------------------------------------------------------------------------------------------

ATTENTION_CLASSES = {
    "RTDetrSelfAttention": "rt_detr", "RTDetrV2SelfAttention": "rt_detr_v2", "DFineSelfAttention": "d_fine",
    "Deimv2SelfAttention": "deimv2", "DeformableDetrSelfAttention": "deformable_detr", "DetrSelfAttention": "detr",
    "ConditionalDetrSelfAttention": "conditional_detr", "MaskFormerDetrSelfAttention": "maskformer",
    "PPDocLayoutV2SelfAttention": "pp_doclayout_v2", "PPDocLayoutV3SelfAttention": "pp_doclayout_v3",
    "PPDocLayoutV4SelfAttention": "pp_doclayout_v4",
}


def test_attention_class_list_is_the_family_list():
    assert set(ATTENTION_CLASSES) == set(tf_family.SELF_ATTENTION)


def _attention(cls_name: str, dropout: float = 0.0, E: int = 48, H: int = 4):
    mod, cls = _module(ATTENTION_CLASSES[cls_name], cls_name)
    cfg = next(getattr(mod, n) for n in dir(mod) if n.endswith("Config") and isinstance(getattr(mod, n), type)
               and issubclass(getattr(mod, n), transformers.PretrainedConfig) and "Backbone" not in n
               and getattr(mod, n).__module__.startswith("transformers.models." + ATTENTION_CLASSES[cls_name]))
    torch.manual_seed(5)
    m = cls(config=cfg(), hidden_size=E, num_attention_heads=H, dropout=dropout)
    for lin in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
        torch.nn.init.normal_(lin.bias, std=0.1)
    return m


def _x_pos_mask(N=2, T=13, E=48, H=4, mask="none", seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, E, generator=g)
    pos = torch.randn(1, T, E, generator=g)
    if mask == "none":
        m = None
    elif mask == "2d":  # the decoder's denoising mask form: float [T, T], -inf blocked
        m = torch.zeros(T, T)
        m[T // 2:, : T // 3] = float("-inf")
    elif mask == "4d":  # the [N, 1, T, T] additive form transformers builds for padding
        m = torch.zeros(N, 1, T, T)
        m[0, :, :, -3:] = torch.finfo(torch.float32).min
    elif mask == "4d-heads":
        m = torch.randn(N, H, T, T, generator=g)
    else:
        m = torch.rand(N, 1, T, T, generator=g) > 0.3  # bool: True = attend (sdpa's convention)
    return x, pos, m


@pytest.mark.parametrize("cls_name", list(ATTENTION_CLASSES))
@pytest.mark.parametrize("mask", ["none", "2d", "4d"])
def test_every_attention_class(cls_name, mask, monkeypatch):
    m = _attention(cls_name).eval()
    holder = torch.nn.ModuleList([m])
    x, pos, am = _x_pos_mask(mask=mask)
    with torch.no_grad():
        ref, _ = m(x, attention_mask=am, position_embeddings=pos)
        ref_nopos, _ = m(x, attention_mask=am)
    handle = rtdetr_kernels.patch(holder, msda=False)
    assert handle.counts() == {"attention": {cls_name: 1}}
    with _spy(monkeypatch) as calls, torch.no_grad():
        out, weights = m(x, attention_mask=am, position_embeddings=pos)
        out_nopos, _ = m(x, attention_mask=am)
    assert weights is None and len(calls["aifi_attention"]) == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_nopos, ref_nopos, rtol=1e-5, atol=1e-5)
    handle.revert()


@pytest.mark.parametrize("case", ["output_attentions", "dropout", "bool-mask", "pos-shape"])
def test_attention_fallbacks(case, monkeypatch):
    m = _attention("RTDetrSelfAttention", dropout=0.3 if case == "dropout" else 0.0)
    m.train(case == "dropout")
    x, pos, am = _x_pos_mask(mask="bool" if case == "bool-mask" else "none")
    kwargs = {"output_attentions": True} if case == "output_attentions" else {}
    if case == "pos-shape":
        pos = pos[:, :, :16].repeat(1, 1, 3)[:, :5]  # [1, 5, E]: not [., T, E]; the original raises on it too
    holder = torch.nn.ModuleList([m])

    def run():
        torch.manual_seed(8)
        return m(x, attention_mask=am, position_embeddings=pos, **kwargs)

    if case == "pos-shape":
        with pytest.raises(RuntimeError):
            run()
        handle = rtdetr_kernels.patch(holder, msda=False)
        with _spy(monkeypatch) as calls, pytest.raises(RuntimeError):
            run()
        assert not calls["aifi_attention"]
        handle.revert()
        return
    ref = run()
    handle = rtdetr_kernels.patch(holder, msda=False)
    with _spy(monkeypatch) as calls:
        out = run()
    assert not calls["aifi_attention"]  # the original ran
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    handle.revert()


def test_attention_4d_per_head_mask_and_gradients():
    m = _attention("DFineSelfAttention").train()
    twin = copy.deepcopy(m)
    x, pos, am = _x_pos_mask(mask="4d-heads")
    x.requires_grad_(True)
    ref, _ = twin(x, attention_mask=am, position_embeddings=pos)
    ref.square().sum().backward()
    handle = rtdetr_kernels.patch(torch.nn.ModuleList([m]), msda=False)
    x2 = x.detach().clone().requires_grad_(True)
    out, _ = m(x2, attention_mask=am, position_embeddings=pos)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    _assert_grads_close(dict(m.named_parameters()), dict(twin.named_parameters()))
    assert m.forward.cache is None  # training: never cached
    handle.revert()


def test_attention_weight_cache():
    m = _attention("RTDetrSelfAttention").eval()
    handle = rtdetr_kernels.patch(torch.nn.ModuleList([m]), msda=False)
    x, pos, _ = _x_pos_mask()
    with torch.no_grad():
        first, _ = m(x, position_embeddings=pos)
        cache = m.forward.cache
        assert cache is not None
        again, _ = m(x, position_embeddings=pos)
        assert m.forward.cache is cache and torch.equal(again, first)  # served from the cache
        m.k_proj.weight.mul_(1.5)  # an in-place update bumps _version: the cache is rebuilt
        changed, _ = m(x, position_embeddings=pos)
        assert m.forward.cache is not cache
    handle.revert()
    with torch.no_grad():
        ref, _ = m(x, position_embeddings=pos)
    torch.testing.assert_close(changed, ref, rtol=1e-5, atol=1e-5)
    assert (changed - first).abs().max() > 1e-3
    handle = rtdetr_kernels.patch(torch.nn.ModuleList([m]), msda=False)
    out, _ = m(x, position_embeddings=pos)  # eval with grad enabled: not cached, the graph reaches the weights
    assert m.forward.cache is None
    out.sum().backward()
    assert m.q_proj.weight.grad is not None and m.v_proj.weight.grad.abs().max() > 0
    handle.revert()


def test_output_attentions_through_the_model(monkeypatch):
    """output_attentions runs the original attention (only the eager core returns weights; sdpa, the
    default, returns none)."""
    model = _build("rtdetr").eval()
    model.set_attn_implementation("eager")
    x = _images(1)
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True)
    handle = rtdetr_kernels.patch(model)
    with _spy(monkeypatch) as calls, torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    assert not calls["aifi_attention"] and len(calls["ms_deform_attn"]) == 2
    assert len(ref.decoder_attentions) == 2 and len(out.decoder_attentions) == 2
    for a, b in zip(out.decoder_attentions, ref.decoder_attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _assert_outputs_close(out, ref, "output_attentions")
    handle.revert()


def test_encoder_layer_clamp_is_the_same():
    """The patched encoder layer's branch-free clamp leaves finite values alone and clamps like upstream
    once a value is not finite (pre-norm: no final LayerNorm turns the inf into NaN)."""
    torch.manual_seed(0)
    model = _rtdetr(normalize_before=True).train()
    layer = model.model.encoder.aifi[0].layers[0]
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 12, 64)
    handle = rtdetr_kernels.patch(torch.nn.ModuleList([layer]), attention=True, msda=False)
    assert handle.counts()["attention"]["RTDetrEncoderLayer"] == 1
    for poison in (False, True):
        if poison:  # an inf in the MLP's output bias: the layer's output is not finite
            for m in (layer, twin):
                with torch.no_grad():
                    m.mlp.fc2.bias[3] = float("inf")
        torch.manual_seed(9)
        out = layer(x, attention_mask=None, spatial_position_embeddings=None)
        torch.manual_seed(9)
        ref = twin(x, attention_mask=None, spatial_position_embeddings=None)
        assert torch.isfinite(ref).all()  # clamped where poisoned
        assert (float(ref.abs().max()) > 1e38) == poison
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    handle.revert()


# --------------------------------------------------------------------------------------------
# topk: the post-processors
# --------------------------------------------------------------------------------------------


class _Out:
    def __init__(self, logits, boxes):
        self.logits, self.pred_boxes = logits, boxes


def _detections(N=3, Q=40, C=7, seed=10):
    g = torch.Generator().manual_seed(seed)
    return _Out(torch.randn(N, Q, C, generator=g) * 2, torch.rand(N, Q, 4, generator=g) * 0.5 + 0.1)


@pytest.mark.parametrize("name", ["RTDetrImageProcessor", "RTDetrImageProcessorPil", "DeformableDetrImageProcessor",
                                  "DeformableDetrImageProcessorPil"])
def test_post_processor(name, monkeypatch):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    try:
        proc = cls()
    except ImportError as e:  # the torchvision backend needs torchvision
        pytest.skip(f"{name}: {e}")
    out = _detections()
    sizes = [(480, 640), (333, 500), (120, 97)]
    cases = [dict(threshold=0.3), dict(threshold=0.5, target_sizes=sizes), dict(threshold=0.2, target_sizes=torch.tensor(sizes))]
    if name.startswith("Deformable"):
        cases.append(dict(threshold=0.1, top_k=25))
    else:
        cases.append(dict(threshold=0.4, use_focal_loss=False))
    refs = [proc.post_process_object_detection(out, **kw) for kw in cases]
    handle = tf_family.patch_processor(proc)
    assert tf_family.patch_processor(proc) is handle
    assert handle.counts() == {"topk": {name: 1}}
    assert f"topk: 1 x {name} (method rebind" in handle.report()
    with _spy(monkeypatch) as calls:
        got = [proc.post_process_object_detection(out, **kw) for kw in cases]
    assert len(calls["topk_select_flat"]) == (4 if name.startswith("Deformable") else 3)  # focal off: the original
    for kw, a, b in zip(cases, got, refs):
        assert len(a) == len(b)
        for da, db in zip(a, b):
            assert da["scores"].numel() > 0, kw
            for key in ("scores", "labels", "boxes"):
                torch.testing.assert_close(da[key], db[key], rtol=1e-6, atol=1e-6, msg=f"{kw} {key}")
    handle.revert()
    assert "post_process_object_detection" not in proc.__dict__


def test_post_processor_saturated_scores():
    """Logits above about 17 all give a float32 sigmoid of exactly 1.0: upstream's ``torch.topk`` returns
    such ties in no defined order, the op by lower query, then class. Same scores, same detections."""
    proc = transformers.RTDetrImageProcessor()
    out = _detections(N=2, Q=30, C=4)
    out.logits[0, [3, 17, 9], [1, 2, 0]] = torch.tensor([25.0, 19.0, 30.0])
    out.logits[1, 5, :] = 40.0
    ref = proc.post_process_object_detection(out, threshold=0.3)
    handle = tf_family.patch_processor(proc)
    got = proc.post_process_object_detection(out, threshold=0.3)
    handle.revert()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)
        key = lambda d: sorted(zip(d["scores"].tolist(), d["labels"].tolist(), map(tuple, d["boxes"].tolist())))
        assert key(a) == key(b)
    assert got[1]["labels"][:4].tolist() == [0, 1, 2, 3]  # query 5's four saturated classes, lower class first
    with pytest.raises(ValueError, match="processor"):
        tf_family.patch_processor(object())


# --------------------------------------------------------------------------------------------
# The kernels package path
# --------------------------------------------------------------------------------------------


def test_kernels_package_kernelize(monkeypatch):
    """``kernels.kernelize`` with the local layer. From the repository root (``python -m pytest`` puts the
    working directory first on sys.path), ``import kernels`` finds this repository's ``kernels/`` folder
    (the source of rtdetr_kernels, which defines nothing under that name) before Hugging Face's package;
    ``hub_kernels()`` imports the package anyway."""
    if not _hub_kernels_installed():
        pytest.skip("the 'kernels' package (Hugging Face, pinned 0.17.2) is not installed")
    shadowed = any(os.path.isfile(os.path.join(p or os.curdir, "kernels", "_library.py")) for p in sys.path)
    if shadowed and "kernels" not in sys.modules:  # the trap, as a test run from the repository root meets it
        assert os.path.isfile(os.path.join(os.path.dirname(importlib.util.find_spec("kernels").origin), "_library.py"))
    kernels = tf_family.hub_kernels()
    assert sys.modules["kernels"] is kernels and hasattr(kernels, "kernelize")
    assert not os.path.isfile(os.path.join(os.path.dirname(kernels.__file__), "_library.py"))
    from rtdetr_kernels.integrations.dropin import MultiScaleDeformableAttention as Layer

    model = _build("rtdetr").eval()
    x = _images(1)
    with torch.no_grad():
        ref = model(pixel_values=x)
    targets = [m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"]
    cls = type(targets[0])
    hooked_before = "kernel_layer_name" in cls.__dict__
    try:
        with kernels.use_kernel_mapping({}):  # keeps the global registration below inside this block
            hooked = tf_family.register_kernels(model, devices=("cpu",))
            assert hooked == ([] if hooked_before else [cls])
            for mode in (kernels.Mode.INFERENCE, kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE):
                kernels.kernelize(model, mode=mode, device="cpu")
                assert all(m.forward.__func__ is Layer.forward for m in targets)
                with torch.no_grad():
                    out = model(pixel_values=x)
                _assert_outputs_close(out, ref, f"kernelize {mode}")
    finally:
        for m in targets:
            m.__dict__.pop("forward", None)
        if not hooked_before:
            for attr in ("kernel_layer_name", "kernel_condition"):
                if attr in cls.__dict__:
                    delattr(cls, attr)


def _hub_kernels_installed() -> bool:
    try:
        from importlib import metadata

        metadata.version("kernels")
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Whole-model capture
# --------------------------------------------------------------------------------------------


def test_capture_eval_no_graph_breaks():
    """Patched RT-DETR at fixed shapes traces as one graph (unpatched too; the patch must not add breaks)."""
    model = _build("rtdetr").eval()
    rtdetr_kernels.patch(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(pixel_values=_images(1))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_capture_training_step_fullgraph():
    """A training step (denoising on) of the patched RT-DETR model compiles as one graph, forward and
    backward (aot_eager: the custom ops' backward traced too), and matches the eager patched step.
    Two upstream breaks are handled: the encoder layer's ``if not torch.isfinite(h).all()`` (the patch
    makes it branch-free) and ``torch.nonzero`` in ``get_contrastive_denoising_training_group`` (a
    data-dependent size: ``capture_dynamic_output_shape_ops``)."""
    model = _build("rtdetr").train()
    rtdetr_kernels.patch(model)
    x, labels = _images(1), _labels()[:1]

    def step(fn):
        torch.manual_seed(11)
        out = fn(pixel_values=x, labels=labels)
        loss = out.last_hidden_state.square().mean() + out.enc_topk_logits.sigmoid().mean() + out.init_reference_points.mean()
        loss.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    ref_loss, ref_grads = step(model.model)
    torch._dynamo.reset()
    # the config's own patch, not monkeypatch: undoing a setattr on an aliased config entry breaks it for
    # every later test (torch.export then fails reading it)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model.model, fullgraph=True, backend="aot_eager")
        loss, grads = step(compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    top = max(float(r.abs().max()) for r in ref_grads if r is not None)
    for g, r, p in zip(grads, ref_grads, model.parameters()):
        if r is None:  # AOTAutograd returns zeros for the parameters eager autograd never reaches
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL * max(float(r.abs().max()), 1e-3 * top))
    torch._dynamo.reset()
