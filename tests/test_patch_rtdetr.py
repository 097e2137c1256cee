"""rtdetr_kernels.patch on the reference RT-DETR (the package rtdetr; the official lyuwenyu modules have the
same classes and attributes): tiny v1, v2 and v2-discrete models (and v2's other query-selection methods),
patched vs unpatched in float64 (eval outputs, a training step with denoising queries: losses and every
parameter gradient), the handle (report, counts, revert, patching twice, each kind alone), exact query
selection and post-processing through the top-k op, the AIFIAttention drop-in against nn.MultiheadAttention,
and whole-model capture under torch.compile(fullgraph=True)."""

import copy

import pytest
import torch
from torch import nn

import rtdetr
import rtdetr_kernels
from rtdetr.backbone import PResNet
from rtdetr.decoder import RTDETRTransformer
from rtdetr.encoder import HybridEncoder
from rtdetr.testing import randomize_
from rtdetr_kernels.integrations.dropin import AIFIAttention
from rtdetr_kernels.integrations.rtdetr import apply_to_rtdetr

from helpers import OpCalls

NUM_CLASSES = 6
HW = (64, 96)  # 8x12, 4x6, 2x3 maps: non-square, 126 tokens for 30 queries


def tiny(version="v1", method="default", num_points=4, query_select="default", seed=0, dropout=0.0):
    """rtdetr_r18vd wired as build_model does, narrowed: width 64 (8 heads of 8), 2 decoder layers, 30 queries,
    20 denoising queries; randomised with scaled class heads so that scores do not tie."""
    torch.manual_seed(seed)
    backbone = PResNet(depth=18, variant="d", num_stages=4, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False)
    encoder = HybridEncoder(in_channels=[128, 256, 512], hidden_dim=64, nhead=8, dim_feedforward=128, dropout=dropout,
                            expansion=0.5, version=version)
    kw = dict(cross_attn_method=method, query_select_method=query_select) if version == "v2" else {}
    decoder = RTDETRTransformer(num_classes=NUM_CLASSES, hidden_dim=64, num_queries=30, feat_channels=[64] * 3,
                                nhead=8, num_layers=2, dim_feedforward=128, dropout=dropout, num_denoising=20,
                                version=version, num_points=num_points, **kw)
    model = rtdetr.RTDETR(backbone, encoder, decoder)
    return randomize_(model, seed, score_scale=4.0)


CASES = {
    "v1": dict(version="v1"),
    "v2": dict(version="v2", num_points=[4, 4, 2]),
    "v2-discrete": dict(version="v2", num_points=[4, 4, 2], method="discrete"),
    "v2-one2many": dict(version="v2", query_select="one2many"),
    "v2-agnostic": dict(version="v2", query_select="agnostic"),
}


def _inputs(dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, *HW, generator=gen, dtype=dtype)
    boxes = lambda k: torch.cat([torch.rand(k, 2, generator=gen) * 0.6 + 0.2,
                                 torch.rand(k, 2, generator=gen) * 0.3 + 0.05], -1).to(dtype)
    targets = [{"labels": torch.tensor([1, 5, 3]), "boxes": boxes(3)}, {"labels": torch.tensor([2]), "boxes": boxes(1)}]
    return images, targets


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
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in flat.items()}, {k: v.detach() for k, v in losses.items()}, grads


def _assert_close(got, expected, what, rtol, atol):
    assert set(got) == set(expected), what
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")


def _state(model):
    return list(model.state_dict().keys()), [id(p) for p in model.parameters()], [id(b) for b in model.buffers()]


@pytest.mark.parametrize("case", ["v1", "v2", "v2-discrete"])
def test_patched_matches_unpatched(case):
    model = tiny(**CASES[case]).double()
    criterion = rtdetr.build_criterion(num_classes=NUM_CLASSES)
    images, targets = _inputs()
    before = _state(model)
    snapshot = copy.deepcopy(model.state_dict())  # a training step moves BatchNorm's running statistics
    expected_eval = {k: v.detach() for k, v in model.eval()(images).items()}
    expected_train = _train_step(model.train(), criterion, images, targets)
    model.load_state_dict(snapshot)  # copies into the same tensors

    handle = rtdetr_kernels.patch(model)
    assert _state(model) == before  # no parameter, buffer or key changed; the same objects
    counts = handle.counts()
    assert counts["msda"] == {"MSDeformableAttention": 2}
    assert counts["attention"] == {"TransformerEncoderLayer": 1, "TransformerDecoderLayer": 2}
    assert counts["topk"] == {"RTDETRTransformer": 2}  # _get_decoder_input and _select_topk

    with OpCalls("aifi_attention") as attn, OpCalls("topk_select") as topk, OpCalls("ms_deform_attn") as msda:
        got_eval = {k: v.detach() for k, v in model.eval()(images).items()}
        got_train = _train_step(model.train(), criterion, images, targets)
    # eval: 1 encoder + 2 decoder layers (eval_idx is the last), one selection; training the same again
    assert len(attn.calls) == 6 and len(topk.calls) == 2 and len(msda.calls) == 4
    masks = [c[7] for c in attn.calls[4:]]  # (x, pos, 4 weights, heads, mask, backend)  # the training step's decoder layers get the denoising mask
    n_dn = 3 * 2 * (20 // 3)  # 3 targets at most: 6 groups of 3 positive and 3 negative queries
    assert all(m is not None and m.dtype == torch.bool and m.shape == (n_dn + 30, n_dn + 30) for m in masks)

    # float64 end to end: each op differs from the code it replaces by rounding (~1e-16 relative);
    # through the model, the criterion and the backward the differences stay below 1e-12 relative
    # (the absolute floor covers gradients that are mathematically zero)
    _assert_close(got_eval, expected_eval, "eval", rtol=1e-10, atol=1e-12)
    _assert_close(got_train[0], expected_train[0], "train output", rtol=1e-10, atol=1e-12)
    _assert_close(got_train[1], expected_train[1], "loss", rtol=1e-10, atol=1e-12)
    _assert_close(got_train[2], expected_train[2], "grad", rtol=1e-9, atol=1e-12)
    assert len(got_train[2]) > 100  # every trainable parameter has a gradient

    handle.revert()
    model.load_state_dict(snapshot)
    assert _state(model) == before
    assert not any("forward" in m.__dict__ or "_get_decoder_input" in m.__dict__ for m in model.modules())
    assert [type(m.ms_deformable_attn_core) for m in model.modules() if hasattr(m, "ms_deformable_attn_core")] == \
        [type(rtdetr.decoder.MSDeformableAttention(64, 8, 3, 4, version=CASES[case]["version"]).ms_deformable_attn_core)] * 2
    with OpCalls("aifi_attention") as attn:
        reverted = {k: v.detach() for k, v in model.eval()(images).items()}
    assert not attn.calls
    _assert_close(reverted, expected_eval, "reverted", rtol=0, atol=0)


def test_float32_eval_and_op_tolerance():
    """float32: the ops differ from the code they replace at float32 rounding; the model's outputs by a few ulps."""
    model = tiny("v1").eval()
    images, _ = _inputs(torch.float32)
    expected = model(images)
    with rtdetr_kernels.patch(model):
        got = model(images)
    _assert_close(got, expected, "float32 eval", rtol=1e-4, atol=1e-5)


def test_handle_report_twice_revert_and_each_kind_alone():
    model = tiny("v2", method="discrete", num_points=[4, 4, 2])
    images, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="all False"):
        rtdetr_kernels.patch(model, msda=False, attention=False, topk=False)

    expected = {"msda": {"MSDeformableAttention": 2},
                "attention": {"TransformerEncoderLayer": 1, "TransformerDecoderLayer": 2},
                "topk": {"RTDETRTransformer": 2}}
    for kind in expected:
        handle = rtdetr_kernels.patch(model, **{k: k == kind for k in expected})
        assert handle.counts() == {kind: expected[kind]}
        with OpCalls({"msda": "ms_deform_attn", "attention": "aifi_attention", "topk": "topk_select"}[kind]) as calls:
            model.eval()(images)
        assert calls.calls
        handle.revert()
        assert handle.counts() == {} and not handle.active

    handle = rtdetr_kernels.patch(model, backend="reference")
    assert rtdetr_kernels.patch(model) is handle  # twice: a no-op, the first handle
    core = model.decoder.decoder.layers[0].cross_attn.ms_deformable_attn_core
    assert core.keywords == {"method": "discrete", "discrete_clamp": "per_axis", "backend": "reference"}
    report = handle.report()
    assert "(backend 'reference')" in report
    assert "msda: 2 x MSDeformableAttention (attribute rebind; ms_deformable_attn_core: ms_deform_attn (v2, discrete))" in report
    assert "attention: 1 x TransformerEncoderLayer (forward swap" in report
    assert "attention: 2 x TransformerDecoderLayer (forward swap; self_attn: aifi_attention(x, pos, mask))" in report  # v2: no clamp
    assert "enc_bbox_head on the k selected tokens" in report and "process-wide" not in report
    handle.revert()
    handle.revert()  # safe twice
    assert rtdetr_kernels.patch(model) is not handle


def test_v1_decoder_layer_keeps_its_clamp():
    """The v1 layer ends with norm3(tgt.clamp(+-65504)) (fp16 overflow guard): with huge FFN outputs the
    patched layer must clamp exactly as the original does."""
    layer = rtdetr.decoder.TransformerDecoderLayer(64, 8, 128, n_levels=1, n_points=2, version="v1").double().eval()
    with torch.no_grad():
        layer.linear2.weight.mul_(1e6)
        layer.linear2.bias.normal_(0, 1e6)
    gen = torch.Generator().manual_seed(3)
    tgt, pos = torch.randn(2, 9, 64, generator=gen, dtype=torch.float64), torch.randn(2, 9, 64, generator=gen, dtype=torch.float64)
    ref_points = torch.rand(2, 9, 1, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    memory = torch.randn(2, 20, 64, generator=gen, dtype=torch.float64)
    args = (tgt, ref_points, memory, [(4, 5)], None, None, pos)
    expected = layer(*args)
    unclamped = layer.norm3(tgt * 0 + 1e6)  # sanity: the guard changes results at this scale
    assert not torch.allclose(expected, unclamped)
    handle = rtdetr_kernels.patch(layer, msda=False, topk=False)
    assert "norm3(clamp)" in handle.report()
    torch.testing.assert_close(layer(*args), expected, rtol=1e-10, atol=1e-12)


def test_dropout_in_training_falls_back_to_the_original():
    model = tiny("v1", dropout=0.1)
    images, targets = _inputs(torch.float32)
    rtdetr_kernels.patch(model, msda=False, topk=False)
    with OpCalls("aifi_attention") as calls:
        model.train()(images, targets)
    assert not calls.calls  # attention dropout > 0 in training: nn.MultiheadAttention runs
    with OpCalls("aifi_attention") as calls:
        model.eval()(images)
    assert len(calls.calls) == 3  # eval: no dropout, the op


def test_deepcopy_of_a_patched_model_runs_its_own_modules():
    """The swapped forwards hold no reference to the modules they were made for: a deep copy is patched
    too and runs its own layers (its own parameters)."""
    model = tiny("v1").eval()
    images, _ = _inputs(torch.float32)
    rtdetr_kernels.patch(model)
    twin = copy.deepcopy(model)
    layer = twin.encoder.encoder[0].layers[0]
    assert layer.forward.__self__ is layer
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.01)
    with OpCalls("aifi_attention") as calls:
        out = twin(images)["pred_logits"]
    assert len(calls.calls) == 3
    assert not torch.allclose(out, model(images)["pred_logits"])


# --------------------------------------------------------------------------------------------
# Query selection and the post-processor: identical results through the op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["v1", "v2", "v2-one2many", "v2-agnostic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_query_selection_is_exact(case, dtype):
    """The patched _get_decoder_input (top-k through the op, enc_bbox_head on the k selected rows) selects the
    same tokens (bit-identical targets and logits) and gives the same boxes to the last bit or within an ulp
    (the GEMM of k rows may block differently from the GEMM of T rows). The gradients are equal up to the order
    of floating-point sums (enc_bbox_head's weight gradients sum k rows instead of T, the other T - k being
    exact zeros; the memory's gradient collects its parts in another order): within a few ulps (measured
    here: bitwise for most, at most 4e-7 relative in float32 and 5e-16 in float64)."""
    model = tiny(**CASES[case]).to(dtype).train()
    dec = model.decoder
    shapes = [(HW[0] // s, HW[1] // s) for s in (8, 16, 32)]
    gen = torch.Generator().manual_seed(7)
    memory = torch.randn(3, sum(h * w for h, w in shapes), 64, generator=gen, dtype=dtype).requires_grad_()
    weights = [torch.randn(3, 30, d, generator=gen, dtype=dtype) for d in (4, NUM_CLASSES if case != "v2-agnostic" else 1)]

    def run():
        dec.zero_grad(set_to_none=True)
        memory.grad = None
        target, ref, boxes, logits = dec._get_decoder_input(memory, shapes)
        ((boxes * weights[0]).sum() + (logits * weights[1]).sum()).backward()
        grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}
        return [target, ref, boxes, logits], grads, memory.grad.clone()

    expected = run()
    with rtdetr_kernels.patch(model, msda=False, attention=False):
        with OpCalls("topk_select") as calls:
            got = run()
        assert len(calls.calls) == 1
        # the standalone _select_topk (the official v2 path) gives the original's rows too
        logits = torch.randn(3, 40, NUM_CLASSES if case != "v2-agnostic" else 1, generator=gen, dtype=dtype)
        mem, coords = torch.randn(3, 40, 64, generator=gen, dtype=dtype), torch.randn(3, 40, 4, generator=gen, dtype=dtype)
        patched_select = dec._select_topk(mem, logits, coords, 11)
    ulps = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    target, ref, boxes, topk_logits = got[0]
    assert torch.equal(target, expected[0][0]) and torch.equal(topk_logits, expected[0][3])  # the same tokens, copied
    # enc_bbox_head on the k selected rows: the same rows through the same layers; a CPU GEMM may block k rows
    # differently from T rows, so the boxes are equal to the last bit or within an ulp or two
    for a, b in ((ref, expected[0][1]), (boxes, expected[0][2])):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=ulps, atol=ulps)
    assert set(got[1]) == set(expected[1])
    for name, g in [("memory", expected[2])] + list(expected[1].items()):
        g_got = got[2] if name == "memory" else got[1][name]
        torch.testing.assert_close(g_got, g, rtol=ulps, atol=ulps * g.abs().max().item(), msg=lambda m: f"{name}: {m}")
    for a, b in zip(patched_select, dec._select_topk(mem, logits, coords, 11)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deploy", [False, True], ids=["lists", "deploy"])
@pytest.mark.parametrize("remap", [False, True], ids=["labels", "coco-ids"])
def test_postprocessor_is_exact(deploy, remap):
    gen = torch.Generator().manual_seed(11)
    C = 80 if remap else 7
    # distinct scores: each image's logits a permutation of a grid 8 / (Q * C) apart in [-4, 4], so the float32
    # sigmoids are >= 3e-5 apart (ties would be ordered by the op's rule, which torch.topk does not promise)
    logits = torch.stack([torch.randperm(50 * C, generator=gen) for _ in range(3)]).float() * (8 / (50 * C)) - 4
    logits = logits.reshape(3, 50, C)
    assert all(len(torch.sigmoid(row).unique()) == row.numel() for row in logits)
    boxes = torch.rand(3, 50, 4, generator=gen) * 0.5 + 0.25
    sizes = torch.tensor([[640, 480], [320, 320], [97, 131]])
    post = rtdetr.RTDETRPostProcessor(num_classes=C, num_top_queries=40, remap_mscoco_category=remap)
    if deploy:
        post.deploy()
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    expected = post(outputs, sizes)
    handle = rtdetr_kernels.patch(post)
    assert handle.counts() == {"topk": {"RTDETRPostProcessor": 1}}
    with OpCalls("topk_select") as calls:
        got = post(outputs, sizes)
    assert len(calls.calls) == 1
    if deploy:
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert len(got) == len(expected) == 3
        for a, b in zip(got, expected):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the softmax branch runs the original code
    post.use_focal_loss = False
    with OpCalls("topk_select") as calls:
        post(outputs, sizes)
    assert not calls.calls


# --------------------------------------------------------------------------------------------
# AIFIAttention: the drop-in module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("L", [1, 7, 97, 300])
def test_aifi_attention_module_matches_multihead_attention(L, dtype):
    E, H = 64, 8
    mha = nn.MultiheadAttention(E, H, batch_first=True).to(dtype)
    with torch.no_grad():  # biases are zero after init: make them count
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    module = AIFIAttention(E, H, dtype=dtype)
    assert module.state_dict().keys() == mha.state_dict().keys()
    module.load_state_dict(mha.state_dict(), strict=True)  # an official checkpoint's layout
    gen = torch.Generator().manual_seed(L)
    x = torch.randn(2, L, E, generator=gen, dtype=dtype)
    pos = torch.randn(1, L, E, generator=gen, dtype=dtype)
    mask = None
    if L >= 7:  # the denoising pattern: the last rows cannot see the first columns
        mask = torch.zeros(L, L, dtype=torch.bool)
        mask[L // 2:, : L // 3] = True
    grad_out = torch.randn(2, L, E, generator=gen, dtype=dtype)

    def run(m, call):
        m.zero_grad(set_to_none=True)
        xx, pp = x.clone().requires_grad_(), pos.clone().requires_grad_()
        out = call(m, xx, pp)
        out.backward(grad_out)
        return [out.detach(), xx.grad, pp.grad] + [p.grad.clone() for p in m.parameters()]

    call_mha = lambda m, xx, pp: m(xx + pp, xx + pp, xx, attn_mask=mask, need_weights=False)[0]
    expected = run(mha, call_mha)
    got = run(module, lambda m, xx, pp: m(xx, pp, attn_mask=mask))
    if dtype == torch.float64:  # rounding only
        for i, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"tensor {i}: {m}")
        return
    # float32: against the float64 module on the same values, within 2x nn.MultiheadAttention's own float32 error
    x, pos, grad_out = x.double(), pos.double(), grad_out.double()
    mask64 = mask
    exact = run(copy.deepcopy(mha).double(), lambda m, xx, pp: m(xx + pp, xx + pp, xx, attn_mask=mask64, need_weights=False)[0])
    for i, (a, b, ref) in enumerate(zip(got, expected, exact)):
        err, own = (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()
        assert err <= 2 * own + 1e-7 * ref.abs().max().item(), f"tensor {i}: error {err:.3g}, nn.MultiheadAttention's {own:.3g}"


def test_aifi_attention_from_mha_shares_parameters_and_dropout_falls_back():
    mha = nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True)
    module = AIFIAttention.from_mha(mha)
    assert module.in_proj_weight is mha.in_proj_weight and module.in_proj_bias is mha.in_proj_bias
    assert module.out_proj is mha.out_proj and module.state_dict().keys() == mha.state_dict().keys()
    x, pos = torch.randn(3, 11, 32), torch.randn(3, 11, 32)
    torch.manual_seed(0)
    expected = mha(x + pos, x + pos, x, need_weights=False)[0]
    torch.manual_seed(0)
    got = module(x, pos)  # training with dropout: nn.MultiheadAttention's own math, the same dropout draws
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with OpCalls("aifi_attention") as calls:
        module.eval()(x, pos)
    assert len(calls.calls) == 1
    with pytest.raises(ValueError, match="batch_first"):
        AIFIAttention.from_mha(nn.MultiheadAttention(32, 4))


def test_apply_to_rtdetr_still_works():
    model = tiny("v2", num_points=[4, 4, 2]).double().eval()
    images, _ = _inputs()
    expected = model(images)
    patch = apply_to_rtdetr(model, backend="reference")
    assert len(patch) == 2
    with OpCalls("ms_deform_attn") as calls:
        got = model(images)
    assert len(calls.calls) == 2
    _assert_close(got, expected, "apply_to_rtdetr", rtol=1e-10, atol=1e-12)
    patch.revert()
    assert "ms_deformable_attn_core" in model.decoder.decoder.layers[0].cross_attn.__dict__  # the original, restored
    _assert_close(model(images), expected, "reverted", rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Whole-model capture: torch.compile(fullgraph=True) at fixed shapes
# --------------------------------------------------------------------------------------------


def test_compiled_patched_model_eval_fullgraph():
    """Inference: one graph, no graph break (fullgraph=True raises on any), the same outputs as eager."""
    from torch._dynamo.testing import CompileCounter

    model = tiny("v1").eval()
    rtdetr_kernels.patch(model)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        got, expected = compiled(images), model(images)
    assert counter.frame_count == 1
    _assert_close(got, expected, "compiled eval", rtol=0, atol=0)


def test_compiled_patched_model_training_step_fullgraph():
    """A training step: the model's forward in training mode (denoising queries, the decoder mask, the
    encoder aux outputs) as one graph with its backward (aot_eager: AOT autograd traces our ops' fake and
    backward kernels), the criterion eager; loss and every gradient as eager. In float64: the compiled graph
    runs the ops' backward kernels where eager attention on CPU lets autograd record through SDPA, so in
    float32 the two differ by float32 rounding amplified through the backbone (8e-4 relative at one
    entry of its first conv), which would hide a real difference."""
    model = tiny("v1").double()
    rtdetr_kernels.patch(model)
    criterion = rtdetr.build_criterion(num_classes=NUM_CLASSES)
    images, targets = _inputs(torch.float64)
    images = images[:, :, :64, :64]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _train_step(compiled, criterion, images, targets)
    expected = _train_step(model, criterion, images, targets)
    _assert_close(got[1], expected[1], "compiled loss", rtol=1e-10, atol=1e-12)
    _assert_close(got[2], expected[2], "compiled grad", rtol=1e-8, atol=1e-10)
