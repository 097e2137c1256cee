"""Numerical parity of the reference model with transformers' ``RTDetrForObjectDetection`` (5.23.0).

Same random weights (converted with ``rtdetr.convert``), float64, CPU.  Rows of the 300 outputs are compared
order-independently (each of our rows is matched to its nearest transformers row), since random-init class scores
can nearly tie and reorder the top-k.  Known, documented differences: transformers builds anchors in the compute
dtype (official: float32) and its position embedding in float64 (official: float32), so in float64 the faithful
model differs at the float32-rounding level (~1e-7); with ``decoder.anchor_dtype = None`` it agrees to ~1e-9."""
import os
import re

import pytest
import torch

os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ["USE_HUB_KERNELS"] = "0"
transformers = pytest.importorskip("transformers")

import rtdetr  # noqa: E402
from rtdetr.convert import from_transformers, to_transformers  # noqa: E402
from rtdetr.testing import randomize_  # noqa: E402


def _hf_config(name):
    from transformers import RTDetrConfig, RTDetrResNetConfig
    if name == "rtdetr_r18vd":
        bc = RTDetrResNetConfig(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                                out_indices=[2, 3, 4])
        return RTDetrConfig(backbone_config=bc, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5,
                            decoder_layers=3, num_labels=80)
    if name == "rtdetr_r50vd_m":  # official: 6 trained layers, eval_idx=2 -> transformers truncated to 3 layers
        bc = RTDetrResNetConfig(hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck",
                                out_indices=[2, 3, 4])
        return RTDetrConfig(backbone_config=bc, encoder_in_channels=[512, 1024, 2048], hidden_expansion=0.5,
                            decoder_layers=3, num_labels=80)
    if name == "rtdetr_r50vd":
        bc = RTDetrResNetConfig(hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck",
                                out_indices=[2, 3, 4])
        return RTDetrConfig(backbone_config=bc, encoder_in_channels=[512, 1024, 2048], hidden_expansion=1.0,
                            decoder_layers=6, num_labels=80)
    raise ValueError(name)


def _pair(name, seed=0, score_scale=1.0):
    from transformers import RTDetrForObjectDetection
    ours = randomize_(rtdetr.build_model(name), seed=seed, score_scale=score_scale).double().eval()
    hf = RTDetrForObjectDetection(_hf_config(name)).double().eval()
    n_layers = hf.config.decoder_layers
    sd = {k: v for k, v in to_transformers(ours.state_dict()).items()
          if not re.match(r"model\.decoder\.(layers|class_embed|bbox_embed)\.(\d+)\.", k)
          or int(re.match(r"model\.decoder\.\w+\.(\d+)\.", k).group(1)) < n_layers}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if not k.startswith(("class_embed", "bbox_embed"))], missing
    return ours, hf


def _match_rows(a_logits, a_boxes, b_logits, b_boxes):
    """For each batch item, match each of our rows to the nearest transformers row; return matched pairs."""
    a = torch.cat([a_logits, a_boxes], -1)
    b = torch.cat([b_logits, b_boxes], -1)
    perms = []
    for i in range(a.shape[0]):
        d = torch.cdist(a[i], b[i])
        perm = d.argmin(-1)
        assert perm.unique().numel() == perm.numel(), "rows do not match one-to-one"
        perms.append(perm)
    perm = torch.stack(perms)
    return b_logits.gather(1, perm[..., None].expand_as(b_logits)), b_boxes.gather(1, perm[..., None].expand_as(b_boxes))


def _compare(out, hf_out, rtol):
    la, ba = out["pred_logits"], out["pred_boxes"]
    lb, bb = _match_rows(la, ba, hf_out.logits, hf_out.pred_boxes)
    # relative to the tensor's scale (individual logits can be ~0)
    dl = ((la - lb).abs().max() / lb.abs().max()).item()
    db = ((ba - bb).abs().max() / bb.abs().max()).item()
    assert dl <= rtol and db <= rtol, (dl, db)
    return dl, db


@pytest.fixture(scope="module")
def r18_pair():
    return _pair("rtdetr_r18vd", seed=0)


@pytest.fixture(scope="module")
def x320():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 320, 320, generator=g, dtype=torch.float64)


def test_r18_parity_faithful_anchors(r18_pair, x320):
    ours, hf = r18_pair
    with torch.no_grad():
        out, ref = ours(x320), hf(pixel_values=x320)
    dl, db = _compare(out, ref, rtol=1e-6)
    print(f"R18 fp64 320x320 (official float32 anchors/PE): rel logits {dl:.2e}, rel boxes {db:.2e}")


def test_r18_parity_compute_dtype_anchors(r18_pair, x320):
    ours, hf = r18_pair
    ours.decoder.anchor_dtype = None
    try:
        with torch.no_grad():
            out, ref = ours(x320), hf(pixel_values=x320)
    finally:
        ours.decoder.anchor_dtype = torch.float32
    dl, db = _compare(out, ref, rtol=1e-8)
    print(f"R18 fp64 320x320 (anchors in compute dtype): rel logits {dl:.2e}, rel boxes {db:.2e}")


def test_r18_encoder_topk_parity(r18_pair, x320):
    ours, hf = r18_pair
    with torch.no_grad():
        ref = hf(pixel_values=x320)
        enc = ours.encoder(ours.backbone(x320))
        memory, shapes = ours.decoder._get_encoder_input(enc)
        _, ref_unact, enc_boxes, enc_logits = ours.decoder._get_decoder_input(memory, shapes)
    torch.testing.assert_close(enc_logits, ref.enc_topk_logits, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(enc_boxes, ref.enc_topk_bboxes, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip(r18_pair):
    ours, hf = r18_pair
    sd = ours.state_dict()
    back = from_transformers(to_transformers(sd), backbone_num_batches_tracked=True)
    assert back.keys() == sd.keys()
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(back[k], sd[k]), k
    # and from transformers' own (randomly initialised) weights into ours, strict
    fresh = rtdetr.build_model("rtdetr_r18vd").double()
    rtdetr.load_checkpoint(fresh, from_transformers(hf.state_dict()))
    assert torch.equal(fresh.state_dict()["decoder.enc_score_head.weight"], hf.state_dict()["model.enc_score_head.weight"])


@pytest.mark.parametrize("name,seed", [("rtdetr_r50vd", 1), ("rtdetr_r50vd_m", 2)])
def test_r50_parity(name, seed):
    """R50vd, and R50vd-m whose official model trains 6 layers and stops at eval_idx=2 (transformers: 3 layers)."""
    ours, hf = _pair(name, seed=seed, score_scale=4.0)
    if name == "rtdetr_r50vd_m":
        assert ours.decoder.decoder.eval_idx == 2 and ours.decoder.decoder.num_layers == 6
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 320, 320, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out, ref = ours(x), hf(pixel_values=x)
    dl, db = _compare(out, ref, rtol=1e-6)
    print(f"{name} fp64 320x320: rel logits {dl:.2e}, rel boxes {db:.2e}")


def test_position_embedding_layout_vs_transformers():
    from transformers.models.rt_detr.modeling_rt_detr import build_2d_sinusoidal_position_embedding as hf_pe
    w, h = 13, 10
    ours = rtdetr.build_2d_sincos_position_embedding(w, h, 256)[0]
    # official layout for a map of height h and width w == transformers' layout with height and width swapped
    torch.testing.assert_close(ours, hf_pe(height=w, width=h, embed_dim=256), rtol=0, atol=2e-6)
    assert not torch.allclose(ours, hf_pe(height=h, width=w, embed_dim=256), atol=1e-3)
    # identical for square maps
    torch.testing.assert_close(rtdetr.build_2d_sincos_position_embedding(10, 10, 256)[0],
                               hf_pe(height=10, width=10, embed_dim=256), rtol=0, atol=2e-6)
