"""The reference RT-DETR (rtdetr/) with the fused MSDA kernel patched in gives the same outputs and gradients
as with its own grid_sample core: a full training step (denoising queries, criterion) in float64 on a
non-square input, v1 and v2 (per-level points, discrete sampling); and the patch reverts cleanly."""

import pytest
import torch
from torch import nn

import rtdetr
from rtdetr_kernels.integrations.rtdetr import apply_to_rtdetr

from helpers import OpCalls

HW = (160, 192)  # 5x6 .. 20x24 maps: non-square, 630 tokens >= 300 queries


def _targets(gen):
    boxes = lambda k: torch.cat([torch.rand(k, 2, generator=gen) * 0.6 + 0.2,
                                 torch.rand(k, 2, generator=gen) * 0.3 + 0.05], -1).double()
    return [{"labels": torch.tensor([1, 5, 7]), "boxes": boxes(3)}, {"labels": torch.tensor([2]), "boxes": boxes(1)}]


def _train_step(model, criterion, images, targets):
    torch.manual_seed(123)  # the denoising groups are random: the same ones for both runs
    model.zero_grad(set_to_none=True)
    out = model(images, targets)
    losses = criterion(out, targets)
    sum(losses.values()).backward()
    flat = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
    for group in ("aux_outputs", "dn_aux_outputs", "enc_aux_outputs"):
        for i, o in enumerate(out.get(group, [])):
            flat[f"{group}.{i}.logits"], flat[f"{group}.{i}.boxes"] = o["pred_logits"], o["pred_boxes"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in flat.items()}, {k: v.detach() for k, v in losses.items()}, grads


def _assert_same(got, expected, what, rtol, atol):
    assert set(got) == set(expected), what
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")


CASES = [("rtdetr_r18vd", {}), ("rtdetrv2_r18vd", {"num_points": [4, 4, 2]}),
         ("rtdetrv2_r18vd", {"num_points": [4, 4, 2], "cross_attn_method": "discrete"})]


@pytest.mark.parametrize("name,overrides", CASES, ids=["v1", "v2", "v2-discrete"])
def test_patched_model_training_step_matches_grid_sample(name, overrides):
    torch.manual_seed(0)
    model = rtdetr.build_model(name, num_classes=10, **overrides).double().train()
    criterion = rtdetr.build_criterion(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, *HW, generator=gen, dtype=torch.float64)
    targets = _targets(gen)
    originals = [m.ms_deformable_attn_core for m in model.modules() if hasattr(m, "ms_deformable_attn_core")]

    expected = _train_step(model, criterion, images, targets)
    patch = apply_to_rtdetr(model)
    assert len(patch) == model.decoder.num_layers
    with OpCalls("ms_deform_attn") as calls:
        got = _train_step(model, criterion, images, targets)
    assert len(calls.calls) == model.decoder.num_layers  # the kernel really ran, once per layer

    # float64 end to end: the kernel and grid_sample differ by rounding only (~1e-16 relative per sample);
    # through the decoder, the losses and the backward that was measured at <= 2e-14 relative to each
    # gradient's scale (the absolute floor covers gradients that are mathematically zero, ~1e-17)
    _assert_same(got[0], expected[0], "output", rtol=1e-10, atol=1e-12)
    _assert_same(got[1], expected[1], "loss", rtol=1e-10, atol=1e-12)
    _assert_same(got[2], expected[2], "grad", rtol=1e-9, atol=1e-12)
    if overrides.get("cross_attn_method") == "discrete":  # nothing flows to the (frozen) sampling offsets
        assert not any("sampling_offsets" in n for n in got[2])

    patch.revert()
    assert [m.ms_deformable_attn_core for m in model.modules() if hasattr(m, "ms_deformable_attn_core")] == originals
    _assert_same(_train_step(model, criterion, images, targets)[0], expected[0], "reverted", rtol=0, atol=0)


def test_patch_keeps_v2_method_and_clamp():
    model = rtdetr.build_model("rtdetrv2_r18vd", num_points=[4, 4, 2], cross_attn_method="discrete")
    apply_to_rtdetr(model)
    core = model.decoder.decoder.layers[0].cross_attn.ms_deformable_attn_core
    assert core.keywords == {"method": "discrete", "discrete_clamp": "per_axis"}
    # an upstream module (no `discrete_clamp` attribute) gets upstream's clamp; an explicit argument wins
    upstream = rtdetr.decoder.MSDeformableAttention(64, 8, 3, [2, 2, 1], method="discrete", version="v2")
    del upstream.discrete_clamp
    apply_to_rtdetr(upstream)
    assert upstream.ms_deformable_attn_core.keywords == {"method": "discrete", "discrete_clamp": "official"}
    apply_to_rtdetr(model, discrete_clamp="official")
    assert core.keywords["discrete_clamp"] == "per_axis"  # the first patch's core is untouched
    assert model.decoder.decoder.layers[0].cross_attn.ms_deformable_attn_core.keywords["discrete_clamp"] == "official"


def test_discrete_per_axis_matches_reference_on_landscape_maps():
    """The model's own v2 discrete core clamps per axis; the patched kernel must agree on W > H maps,
    where upstream's clamp would differ."""
    torch.manual_seed(0)
    shapes = [(3, 9), (2, 5)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 3, dtype=torch.float64)
    loc = torch.rand(2, 7, 4, 5, 2, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(2, 7, 4, 5, dtype=torch.float64)
    module = rtdetr.decoder.MSDeformableAttention(12, 4, 2, [3, 2], method="discrete", version="v2")
    expected = module.ms_deformable_attn_core(value, shapes, loc, attn, [3, 2])
    apply_to_rtdetr(module)
    torch.testing.assert_close(module.ms_deformable_attn_core(value, shapes, loc, attn, [3, 2]), expected,
                               rtol=0, atol=1e-12)


def test_patching_a_model_without_msda_is_an_error():
    with pytest.raises(ValueError, match="ms_deformable_attn_core"):
        apply_to_rtdetr(nn.Linear(2, 2))
