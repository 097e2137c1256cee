"""Checkpoint loading (official container formats, strictness) and RepVGG deploy fusion."""
import pytest
import torch

import rtdetr


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random weights incl. BN statistics and biases (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * 0.5 + 0.75)
            elif name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * 0.5 + 0.75)
            else:
                scale = 1.0 / max(1, (t[0].numel() if t.dim() > 1 else 1)) ** 0.5
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * scale)
    return model


@pytest.fixture(scope="module")
def src():
    return randomize_(rtdetr.build_model("rtdetr_r18vd"), seed=1).eval()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("container", ["ema", "model", "bare"])
def test_round_trip(tmp_path, src, container):
    sd = src.state_dict()
    obj = {"ema": {"module": sd, "updates": 10}, "model": {}} if container == "ema" else \
        {"model": sd, "last_epoch": 3} if container == "model" else sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = rtdetr.build_model("rtdetr_r18vd").eval()
    rtdetr.load_checkpoint(dst, path)
    _assert_same_weights(src, dst)
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_in_memory_state_dict(src):
    dst = rtdetr.build_model("rtdetr_r18vd")
    rtdetr.load_checkpoint(dst, {"ema": {"module": src.state_dict()}})
    _assert_same_weights(src, dst)


def test_strict_error_lists_keys(src):
    sd = dict(src.state_dict())
    sd.pop("decoder.enc_score_head.bias")
    sd["decoder.bogus.weight"] = torch.zeros(1)
    dst = rtdetr.build_model("rtdetr_r18vd")
    with pytest.raises(RuntimeError) as e:
        rtdetr.load_checkpoint(dst, sd)
    msg = str(e.value)
    assert "missing keys" in msg and "decoder.enc_score_head.bias" in msg
    assert "unexpected keys" in msg and "decoder.bogus.weight" in msg


def test_shape_mismatch_reported(src):
    dst = rtdetr.build_model("rtdetr_r18vd", num_classes=3)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        rtdetr.load_checkpoint(dst, src.state_dict())


def test_frozen_bn_accepts_num_batches_tracked():
    r50 = rtdetr.build_model("rtdetr_r50vd_m")
    sd = dict(r50.state_dict())
    sd["backbone.conv1.conv1_1.norm.num_batches_tracked"] = torch.tensor(5)
    rtdetr.load_checkpoint(r50, sd)


class NotAllowed:  # arbitrary pickled objects must be rejected by torch.load(weights_only=True)
    pass


def test_weights_only_load(tmp_path, src):
    path = tmp_path / "evil.pth"
    torch.save({"model": src.state_dict(), "extra": NotAllowed()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        rtdetr.load_checkpoint(rtdetr.build_model("rtdetr_r18vd"), path)


def test_deploy_fuses_repvgg_fp64():
    torch.manual_seed(0)
    m = randomize_(rtdetr.build_model("rtdetr_r18vd"), seed=3).double().eval()
    x = torch.rand(2, 3, 320, 320, dtype=torch.float64)
    with torch.no_grad():
        before = m(x)
        sd = m.state_dict()
        m.deploy()
        n_fused = sum(1 for mod in m.modules() if isinstance(mod, rtdetr.encoder.RepVggBlock) and hasattr(mod, "conv"))
        assert n_fused == 12  # 4 CSP blocks x 3 RepVGG blocks
        after = m(x)
    torch.testing.assert_close(after["pred_logits"], before["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after["pred_boxes"], before["pred_boxes"], rtol=1e-5, atol=1e-5)
    # the fused conv really is used (unfused branches unchanged, like the official code)
    blk = m.encoder.fpn_blocks[0].bottlenecks[0]
    y = torch.rand(1, blk.ch_in, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(blk.conv(y), blk.conv1(y) + blk.conv2(y), rtol=1e-10, atol=1e-10)
    # a pre-deploy checkpoint still loads into the deployed model and refreshes the fused kernels
    m2 = rtdetr.build_model("rtdetr_r18vd").double().deploy()
    rtdetr.load_checkpoint(m2, sd)
    with torch.no_grad():
        again = m2(x)
    torch.testing.assert_close(again["pred_logits"], before["pred_logits"], rtol=1e-5, atol=1e-5)
