"""RT-DETRv2 decoder options (per-level point counts, discrete sampling, query selection) and training outputs."""
import pytest
import torch

import rtdetr
from rtdetr import ops
from rtdetr.testing import randomize_


def test_v2_defaults_equal_v1_at_inference():
    v1 = randomize_(rtdetr.build_model("rtdetr_r18vd"), seed=0).double().eval()
    v2 = rtdetr.build_model("rtdetrv2_r18vd").double().eval()
    sd = v1.state_dict()
    # v1 -> v2 naming
    ren = {}
    for k, v in sd.items():
        k2 = k.replace("decoder.enc_output.0.", "decoder.enc_output.proj.").replace(
            "decoder.enc_output.1.", "decoder.enc_output.norm.")
        for i in range(3):
            k2 = k2.replace(f"encoder.input_proj.{i}.0.", f"encoder.input_proj.{i}.conv.").replace(
                f"encoder.input_proj.{i}.1.", f"encoder.input_proj.{i}.norm.")
        ren[k2] = v
    own = v2.state_dict()
    for k in own:
        if k not in ren:  # v2-only buffers
            ren[k] = own[k]
    rtdetr.load_checkpoint(v2, ren)
    g = torch.Generator().manual_seed(0)
    for hw in [(320, 320), (640, 640)]:  # 640: the registered v2 anchor buffers are used
        x = torch.rand(1, 3, *hw, generator=g, dtype=torch.float64)
        with torch.no_grad():
            a, b = v1(x), v2(x)
        # v2 has no +-65504 clamp (inactive here) and scales offsets by 1/n_points as a buffer (exact for 4)
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_points", [[4, 4, 2], [3, 2, 1]])
def test_v2_per_level_points(num_points):
    m = rtdetr.build_model("rtdetrv2_r18vd", num_points=num_points).eval()
    attn = m.decoder.decoder.layers[0].cross_attn
    total = sum(num_points)
    assert attn.sampling_offsets.out_features == 8 * total * 2
    assert attn.attention_weights.out_features == 8 * total
    assert attn.num_points_scale.shape == (total,)
    with torch.no_grad():
        out = m(torch.rand(2, 3, 320, 416))
    assert out["pred_logits"].shape == (2, 300, 80) and torch.isfinite(out["pred_boxes"]).all()


def test_v2_core_default_matches_v1_core():
    torch.manual_seed(0)
    shapes = [(8, 6), (4, 3), (2, 2)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 4, 8, dtype=torch.float64)
    loc = torch.rand(2, 5, 4, 3, 2, 2, dtype=torch.float64)
    w = torch.rand(2, 5, 4, 3, 2, dtype=torch.float64)
    a = ops.deformable_attention_core_func(value, shapes, loc, w)
    b = ops.deformable_attention_core_func_v2(value, shapes, loc.flatten(3, 4), w.flatten(3, 4), [2, 2, 2])
    torch.testing.assert_close(a, b)


def test_v2_core_discrete_is_nearest_pixel():
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    N, Lq, M, D = 1, 6, 2, 3
    value = torch.randn(N, S, M, D, dtype=torch.float64)
    pts = [2, 1]
    loc = torch.rand(N, Lq, M, sum(pts), 2, dtype=torch.float64)
    w = torch.rand(N, Lq, M, sum(pts), dtype=torch.float64)
    out = ops.deformable_attention_core_func_v2(value, shapes, loc, w, pts, method="discrete")
    ref = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    start, p0 = 0, 0
    for (h, wd), p in zip(shapes, pts):
        v = value[:, start:start + h * wd].reshape(N, h, wd, M, D)
        for q in range(Lq):
            for m in range(M):
                for j in range(p0, p0 + p):
                    x = min(int(loc[0, q, m, j, 0] * wd + 0.5), wd - 1)
                    y = min(int(loc[0, q, m, j, 1] * h + 0.5), h - 1)
                    ref[0, q, m] += w[0, q, m, j] * v[0, y, x, m]
        start += h * wd
        p0 += p
    torch.testing.assert_close(out, ref.reshape(N, Lq, M * D))
    with pytest.raises(ValueError, match="unknown"):
        ops.deformable_attention_core_func_v2(value, shapes, loc, w, pts, method="bogus")


def test_v2_discrete_model_runs():
    m = rtdetr.build_model("rtdetrv2_r18vd", cross_attn_method="discrete").eval()
    assert not m.decoder.decoder.layers[0].cross_attn.sampling_offsets.weight.requires_grad
    with torch.no_grad():
        out = m(torch.rand(1, 3, 320, 320))
    assert out["pred_boxes"].shape == (1, 300, 4) and torch.isfinite(out["pred_logits"]).all()


@pytest.mark.parametrize("method", ["one2many", "agnostic"])
def test_v2_query_select_methods(method):
    m = rtdetr.build_model("rtdetrv2_r18vd", query_select_method=method).eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 320, 320))
    assert out["pred_logits"].shape == (1, 300, 80)


def test_v1_rejects_v2_options():
    with pytest.raises(ValueError):
        rtdetr.build_model("rtdetr_r18vd", num_points=[4, 4, 2])


def _targets():
    return [{"labels": torch.tensor([1, 5, 7]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1],
                                                                        [0.7, 0.2, 0.3, 0.2]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetrv2_r18vd"])
def test_training_outputs(name):
    torch.manual_seed(0)
    m = rtdetr.build_model(name).train()
    out = m(torch.rand(2, 3, 320, 320), _targets())
    assert out["pred_logits"].shape == (2, 300, 80) and out["pred_boxes"].shape == (2, 300, 4)
    n_layers = 3
    if name.startswith("rtdetr_"):
        assert len(out["aux_outputs"]) == n_layers - 1 + 1  # + encoder top-k appended (v1)
    else:
        assert len(out["aux_outputs"]) == n_layers - 1 and len(out["enc_aux_outputs"]) == 1
    meta = out["dn_meta"]
    num_group = 100 // 3
    assert meta["dn_num_group"] == num_group and meta["dn_num_split"] == [2 * 3 * num_group, 300]
    assert len(out["dn_aux_outputs"]) == n_layers
    assert out["dn_aux_outputs"][0]["pred_logits"].shape == (2, 2 * 3 * num_group, 80)
    assert [len(i) for i in meta["dn_positive_idx"]] == [3 * num_group, 1 * num_group]
    loss = out["pred_logits"].sigmoid().mean() + out["pred_boxes"].mean() + \
        out["dn_aux_outputs"][-1]["pred_boxes"].mean()
    loss.backward()
    assert m.decoder.dec_bbox_head[0].layers[0].weight.grad is not None
    assert m.backbone.conv1.conv1_1.conv.weight.grad is not None


def test_training_without_targets_and_empty_targets():
    m = rtdetr.build_model("rtdetr_r18vd").train()
    out = m(torch.rand(1, 3, 320, 320))
    assert "dn_meta" not in out and out["pred_logits"].shape == (1, 300, 80)
    out = m(torch.rand(1, 3, 320, 320), [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert "dn_meta" not in out


def test_denoising_attn_mask():
    from rtdetr.denoising import get_contrastive_denoising_training_group
    emb = torch.nn.Embedding(81, 16, padding_idx=80)
    cls, box, mask, meta = get_contrastive_denoising_training_group(_targets(), 80, 10, emb, num_denoising=12)
    g = meta["dn_num_group"]
    assert g == 4 and cls.shape == (2, 24, 16) and box.shape == (2, 24, 4) and mask.shape == (34, 34)
    assert mask[24:, :24].all() and not mask[24:, 24:].any()
    for i in range(g):
        for j in range(g):
            blk = mask[6 * i:6 * (i + 1), 6 * j:6 * (j + 1)]
            assert (blk.all() if i != j else not blk.any())
    assert not mask[:24, 24:].any()
