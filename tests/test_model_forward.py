"""Forward-pass shapes, finiteness, input validation, post-processing and core-op sanity of the reference model."""
import copy

import pytest
import torch

import rtdetr
from rtdetr import ops


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return rtdetr.build_model("rtdetr_r18vd").eval()


@pytest.mark.parametrize("hw", [(320, 320), (320, 416)])
def test_eval_output_shapes(r18, hw):
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        out = r18(x)
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 300, 80)
    assert out["pred_boxes"].shape == (2, 300, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert torch.isfinite(out["pred_boxes"]).all()
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()


def test_batch_consistency(r18):
    # float64: in float32 the batched and single convolutions round differently and random-init query scores
    # nearly tie, so a few of the 300 selected queries can change order; in float64 that noise is ~1e-13.
    model = copy.deepcopy(r18).double()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 320, 320, dtype=torch.float64)
    with torch.no_grad():
        both = model(x)
        one = model(x[1:])
    torch.testing.assert_close(both["pred_logits"][1:], one["pred_logits"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(both["pred_boxes"][1:], one["pred_boxes"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,match", [((1, 1, 320, 320), "channels"), ((1, 4, 320, 320), "channels"),
                                         ((1, 3, 320, 300), "multiples of 32"),
                                         ((1, 3, 330, 320), "multiples of 32"), ((3, 320, 320), "shape")])
def test_bad_inputs_raise(r18, shape, match):
    with pytest.raises(ValueError, match=match):
        r18(torch.rand(*shape))


def test_num_classes():
    m = rtdetr.build_model("rtdetr_r18vd", num_classes=3).eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 320, 320))
    assert out["pred_logits"].shape == (1, 300, 3)


def test_postprocessor(r18):
    with torch.no_grad():
        out = r18(torch.rand(2, 3, 320, 416))
    sizes = torch.tensor([[416, 320], [832, 640]])
    res = rtdetr.RTDETRPostProcessor(num_classes=80)(out, sizes)
    assert len(res) == 2
    for r in res:
        assert r["boxes"].shape == (300, 4) and r["labels"].shape == (300,) and r["scores"].shape == (300,)
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
    # reference computation
    scores = out["pred_logits"][0].sigmoid().flatten()
    top = scores.topk(300)
    torch.testing.assert_close(res[0]["scores"], top.values)
    assert torch.equal(res[0]["labels"], top.indices % 80)
    q = top.indices // 80
    b = out["pred_boxes"][0][q]
    xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1) * torch.tensor([416, 320, 416, 320])
    torch.testing.assert_close(res[0]["boxes"], xyxy)
    pp = rtdetr.RTDETRPostProcessor(remap_mscoco_category=True)
    remapped = pp(out, sizes)[0]["labels"]
    assert set(remapped.tolist()) <= set(rtdetr.MSCOCO_CATEGORY_IDS)
    labels, boxes, scores = rtdetr.RTDETRPostProcessor().deploy()(out, sizes)
    assert labels.shape == (2, 300) and boxes.shape == (2, 300, 4)


def test_anchors_inf_for_invalid(r18):
    anchors, valid = r18.decoder._generate_anchors([(80, 80), (40, 40), (20, 20)])
    assert anchors.shape == (1, 8400, 4) and valid.shape == (1, 8400, 1)
    assert int(valid.sum()) == 6084 + 1600 + 400
    inv = ~valid[0, :, 0]
    assert torch.isposinf(anchors[0, inv]).any(dim=-1).all()
    assert torch.isfinite(anchors[0, ~inv]).all()


def test_position_embedding_layout():
    pe = rtdetr.build_2d_sincos_position_embedding(5, 3, 16)  # (w, h, D)
    assert pe.shape == (1, 15, 16)
    # official layout: token t corresponds to (w index, h index) = (t // h, t % h)
    t = 7
    wi, hi = t // 3, t % 3
    omega = 1.0 / (10000 ** (torch.arange(4, dtype=torch.float32) / 4))
    ref = torch.cat([(wi * omega).sin(), (wi * omega).cos(), (hi * omega).sin(), (hi * omega).cos()])
    torch.testing.assert_close(pe[0, t], ref)


def test_select_topk_is_single_method(r18):
    torch.manual_seed(0)
    mem = torch.randn(2, 50, 256)
    logits = torch.randn(2, 50, 80)
    coords = torch.randn(2, 50, 4)
    m, l, c = r18.decoder._select_topk(mem, logits, coords, 10)
    ind = logits.max(-1).values.topk(10, dim=1).indices
    for b in range(2):
        assert torch.equal(m[b], mem[b, ind[b]])
        assert torch.equal(l[b], logits[b, ind[b]])
        assert torch.equal(c[b], coords[b, ind[b]])


def _naive_msda(value, shapes, loc, w):
    # bilinear sampling with zero padding, align_corners=False, written out by hand
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M, D, dtype=value.dtype)
    start = 0
    for l, (H, W) in enumerate(shapes):
        v = value[:, start:start + H * W].reshape(N, H, W, M, D)
        start += H * W
        for p in range(P):
            x = loc[:, :, :, l, p, 0] * W - 0.5
            y = loc[:, :, :, l, p, 1] * H - 0.5
            x0, y0 = x.floor(), y.floor()
            for dx in (0, 1):
                for dy in (0, 1):
                    xi, yi = x0 + dx, y0 + dy
                    wt = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                    ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
                    xc, yc = xi.clamp(0, W - 1).long(), yi.clamp(0, H - 1).long()
                    for n in range(N):
                        for m in range(M):
                            g = v[n, yc[n, :, m], xc[n, :, m], m]  # [Lq, D]
                            out[n, :, m] += (g * (wt[n, :, m] * ok[n, :, m] * w[n, :, m, l, p])[:, None])
    return out.reshape(N, Lq, M * D)


def test_core_func_matches_naive():
    torch.manual_seed(0)
    shapes = [(6, 5), (3, 4)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 2, 3, dtype=torch.float64)
    loc = torch.rand(2, 7, 2, 2, 3, 2, dtype=torch.float64) * 1.2 - 0.1
    w = torch.rand(2, 7, 2, 2, 3, dtype=torch.float64)
    got = ops.deformable_attention_core_func(value, shapes, loc, w)
    torch.testing.assert_close(got, _naive_msda(value, shapes, loc, w))
    got2 = ops.deformable_attention_core_func_v2(value, shapes, loc.flatten(3, 4), w.flatten(3, 4), [3, 3])
    torch.testing.assert_close(got2, got)


def test_core_is_swappable_attribute(r18):
    calls = []

    def spy(value, shapes, loc, w):
        calls.append((value.shape, tuple(map(tuple, shapes)), loc.shape, w.shape))
        return ops.deformable_attention_core_func(value, shapes, loc, w)

    attn = r18.decoder.decoder.layers[0].cross_attn
    assert attn.ms_deformable_attn_core is ops.deformable_attention_core_func
    attn.ms_deformable_attn_core = spy
    try:
        with torch.no_grad():
            r18(torch.rand(1, 3, 320, 320))
    finally:
        attn.ms_deformable_attn_core = ops.deformable_attention_core_func
    assert calls == [((1, 2100, 8, 32), ((40, 40), (20, 20), (10, 10)), (1, 300, 8, 3, 4, 2), (1, 300, 8, 3, 4))]


def test_eval_idx_stops_early():
    m = rtdetr.build_model("rtdetr_r18vd", eval_idx=0).eval()
    seen = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: seen.append(i))
             for i, layer in enumerate(m.decoder.decoder.layers)]
    with torch.no_grad():
        m(torch.rand(1, 3, 320, 320))
    for h in hooks:
        h.remove()
    assert seen == [0]


@pytest.mark.parametrize("name,clamped", [("rtdetr_r18vd", True), ("rtdetrv2_r18vd", False)])
def test_ffn_clamp_v1_only(name, clamped):
    torch.manual_seed(0)
    layer = rtdetr.build_model(name).decoder.decoder.layers[0].eval()
    with torch.no_grad():
        layer.linear2.bias.zero_()
        layer.linear2.bias[0] = 1e6  # pushes one channel far beyond the fp16 range
        tgt = torch.randn(1, 300, 256)
        ref = torch.rand(1, 300, 1, 4) * 0.5 + 0.25
        mem = torch.randn(1, 100 + 25 + 4, 256)
        out = layer(tgt, ref, mem, [(10, 10), (5, 5), (2, 2)])
        # recompute the FFN input to see which normalisation was applied
        x = layer.norm1(tgt + layer.self_attn(tgt, tgt, tgt, need_weights=False)[0])
        x = layer.norm2(x + layer.cross_attn(x, ref, mem, [(10, 10), (5, 5), (2, 2)]))
        y = x + layer.linear2(layer.activation(layer.linear1(x)))
        expect = layer.norm3(y.clamp(-65504, 65504) if clamped else y)
    torch.testing.assert_close(out, expect)


def test_bf16_forward_is_finite():
    # regression: CPU grid_sample on non-contiguous bf16 views produced NaN before the inputs were made contiguous
    torch.manual_seed(0)
    m = rtdetr.build_model("rtdetr_r18vd").eval().to(torch.bfloat16)
    with torch.no_grad():
        out = m(torch.rand(1, 3, 320, 320, dtype=torch.bfloat16))
    assert out["pred_logits"].dtype == torch.bfloat16
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
