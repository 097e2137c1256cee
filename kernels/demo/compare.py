"""What the kernels change: patched vs unpatched outputs on the same inputs, and timings (per op at the model's
own shapes, and end to end), reference vs ours, alternating A/B so that both see the same machine load."""
from __future__ import annotations

import copy

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

import rtdetr_kernels

import rtdetr

from .evaluate import postprocessor


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fns: Dict[str, Callable[[], object]], device, budget: float = 1.0, min_rounds: int = 5,
           max_rounds: int = 200) -> Dict[str, Dict[str, float]]:
    """Median and min seconds per call of each fn; one call of each per round (A, B, A, B, ...) after a warm-up,
    until ``budget`` seconds have passed (at least ``min_rounds`` rounds)."""
    for fn in fns.values():  # warm-up (allocator, lazy init, autotune)
        fn(), fn()
    _sync(device)
    times = {name: [] for name in fns}
    t_end = time.perf_counter() + budget
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < t_end and rounds < max_rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts), "all_s": ts}
            for name, ts in times.items()}


def chosen_backends(device) -> Dict[str, str]:
    """The backend ``auto`` picks for each op on ``device`` (float32), as ``python -m rtdetr_kernels info`` says."""
    backends = rtdetr_kernels.backends
    out = {}
    for op in backends.registered_ops():
        try:
            out[op] = backends.select(backends.Call(op, torch.device(device).type, (torch.float32,)), "auto")
        except backends.BackendUnavailableError as e:
            out[op] = f"none ({e})"
    return out


# ---------------------------------------------------------------------------------------------- parity
def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _align_queries(ref: Dict[str, torch.Tensor], ours: Dict[str, torch.Tensor]):
    """``ours`` with its queries reordered to match ``ref``'s, and how many moved. Tokens with equal scores may
    be selected in another order (the op orders them by lower index; ``torch.topk`` leaves it open): RT-DETR's
    invalid anchors at 640 px all get the same score, and the queries made from them are the same queries in
    another order. Each image's queries are matched one to one (Hungarian, on the largest difference of their
    logits and boxes), so a reordering is not counted as a difference while any other change still is."""
    from scipy.optimize import linear_sum_assignment

    rows = lambda d: torch.cat([d["pred_logits"], d["pred_boxes"]], dim=-1).double().cpu()  # noqa: E731
    a, b = rows(ref), rows(ours)
    perm, moved = [], 0
    for i in range(len(a)):
        cost = (a[i][:, None, :] - b[i][None, :, :]).abs().amax(-1)
        r, c = linear_sum_assignment(cost.numpy())
        col = torch.as_tensor(c)[torch.as_tensor(r).argsort()]
        perm.append(col)
        moved += int((col != torch.arange(len(col))).sum())
    index = torch.stack(perm).to(ours["pred_logits"].device)
    aligned = {k: v.gather(1, index[..., None].expand_as(v)) if k in ("pred_logits", "pred_boxes") else v
               for k, v in ours.items()}
    return aligned, moved


@torch.no_grad()
def _forward(model, images):
    model.eval()
    return {k: v.detach().clone() for k, v in model(images).items() if isinstance(v, torch.Tensor)}


def parity(model, images: torch.Tensor, num_classes: int, threshold: float = 0.3,
           train_batch=None, criterion=None) -> Dict:
    """Unpatched vs patched (``rtdetr_kernels.patch``: MSDA, attention and top-K, backend auto) on the same images: max |difference| of the raw
    outputs, and whether the post-processed detections are the same (labels, boxes within 1e-3 px, scores within
    1e-4), both for those above ``threshold`` (the ones drawn) and for the whole top-k list.  With ``train_batch``
    (images, targets) and ``criterion``: one training forward/backward each (same seed for the denoising noise), max loss and gradient
    differences."""
    device = images.device
    post = postprocessor(model, num_classes)
    sizes = torch.tensor([[images.shape[-1], images.shape[-2]]] * len(images), device=device)
    ref = _forward(model, images)
    patch = rtdetr_kernels.patch(model)
    patched = patch.counts()
    try:
        ours = _forward(model, images)
    finally:
        patch.revert()
    result = {"images": len(images), "image_size": list(images.shape[-2:]), "patched": patched}
    aligned, moved = _align_queries(ref, ours)
    result["queries_reordered"] = moved  # equal-score queries in another order (see _align_queries)
    result["max_abs_diff"] = {k: _max_abs(ref[k], aligned[k]) for k in ("pred_logits", "pred_boxes")}
    result["max_abs_value"] = {k: float(ref[k].abs().max()) for k in ("pred_logits", "pred_boxes")}
    d_ref, d_ours = post(ref, sizes), post(ours, sizes)
    same_all, same_drawn, n_drawn, box_diff = True, True, 0, 0.0
    for a, b in zip(d_ref, d_ours):
        same_all &= bool(torch.equal(a["labels"], b["labels"])) and _max_abs(a["boxes"], b["boxes"]) < 1e-3 \
            and _max_abs(a["scores"], b["scores"]) < 1e-4
        ka, kb = a["scores"] >= threshold, b["scores"] >= threshold
        n_drawn += int(ka.sum())
        if not torch.equal(ka, kb) or not torch.equal(a["labels"][ka], b["labels"][kb]):
            same_drawn = False
            continue
        diff = _max_abs(a["boxes"][ka], b["boxes"][kb])
        box_diff = max(box_diff, diff)
        same_drawn &= diff < 1e-3 and _max_abs(a["scores"][ka], b["scores"][kb]) < 1e-4
    result.update(same_detections=same_drawn, detections_compared=n_drawn, detection_threshold=threshold,
                  max_box_diff_px=box_diff, same_topk_lists=same_all)
    if train_batch is not None and criterion is not None:
        result["training_step"] = _grad_parity(model, *train_batch, criterion)
    return result


def _grad_parity(model, images, targets, criterion) -> Dict:
    def step():
        torch.manual_seed(0)  # the denoising groups draw random noise
        model.train()
        model.zero_grad(set_to_none=True)
        losses = criterion(model(images, targets), targets)
        total = sum(losses.values())
        total.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.eval()
        return float(total.detach()), grads

    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running stats move in train mode
    loss_ref, g_ref = step()
    model.load_state_dict(state)
    patch = rtdetr_kernels.patch(model)
    try:
        loss_ours, g_ours = step()
    finally:
        patch.revert()
        model.load_state_dict(state)
    # per parameter: max |difference| over that parameter's largest gradient entry; parameters whose gradient is at
    # rounding level (e.g. a conv bias right before a BatchNorm: ~1e-9) are left out (their max |g| is below 1e-6 of
    # the largest gradient in the model), as relative differences of noise mean nothing
    scale = max(float(g.abs().max()) for g in g_ref.values())
    rel = {n: _max_abs(g_ref[n], g_ours[n]) / float(g_ref[n].abs().max()) for n in g_ref
           if float(g_ref[n].abs().max()) > 1e-6 * scale}
    worst = max(rel, key=rel.get)
    return {"loss_reference": loss_ref, "loss_patched": loss_ours, "loss_abs_diff": abs(loss_ref - loss_ours),
            "max_grad_rel_diff": rel[worst], "worst_parameter": worst, "parameters_compared": len(rel),
            "parameters_with_grad": len(g_ref),
            "max_grad_abs_diff": max(_max_abs(g_ref[n], g_ours[n]) for n in g_ref), "max_abs_grad": scale}


# ---------------------------------------------------------------------------------------------- timings
def _capture(model, images):
    """One eval forward of the unpatched model, recording the inputs of the first MSDA core call, of the AIFI
    self-attention and of the encoder's top-k query selection."""
    seen = {}
    msda = [m for m in model.modules() if hasattr(m, "ms_deformable_attn_core")]
    originals = [(m, m.ms_deformable_attn_core) for m in msda]

    def record(orig):
        def core(*args, **kwargs):
            seen.setdefault("msda", (orig, args, kwargs))
            return orig(*args, **kwargs)
        return core

    for m, orig in originals:
        m.ms_deformable_attn_core = record(orig)
    mha = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.MultiheadAttention))

    def pre_hook(module, args, kwargs):
        q, k = args[0], args[1]
        v = kwargs.get("value", args[2] if len(args) > 2 else None)
        seen.setdefault("aifi", (module, v.detach(), (q - v).detach()))

    handle = mha.register_forward_pre_hook(pre_hook, with_kwargs=True)
    dec = model.decoder
    select = dec._select_topk

    def topk(memory, logits, coords, k):
        seen.setdefault("topk", (select, memory.detach(), logits.detach(), coords.detach(), k))
        return select(memory, logits, coords, k)

    dec._select_topk = topk
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
        del dec._select_topk
        for m, orig in originals:
            m.ms_deformable_attn_core = orig
    return seen


def _with_grad(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
            for a in args], g


def op_timings(model, images, budget: float = 1.0) -> List[Dict]:
    """Per op at the shapes this model runs on ``images``: the model's own PyTorch code vs rtdetr_kernels (auto),
    forward, and forward + backward for MSDA and AIFI."""
    device = images.device
    seen = _capture(model, images)
    rows = []

    def add(op, shape, mode, fns):
        t = timeit(fns, device, budget)
        ref, ours = t["reference"]["median_s"], t["ours"]["median_s"]
        rows.append({"op": op, "shape": shape, "mode": mode, "reference_ms": ref * 1e3, "ours_ms": ours * 1e3,
                     "speedup": ref / ours if ours > 0 else float("nan")})

    orig, args, _ = seen["msda"]
    value, shapes, loc, w = args
    shape = f"value {list(value.shape)}, {len(shapes)} levels {[tuple(s) for s in shapes]}, queries {loc.shape[1]}, points {loc.shape[-2]}"
    add("ms_deform_attn", shape, "forward", {
        "reference": lambda: rtdetr.ops.deformable_attention_core_func(value, shapes, loc, w),
        "ours": lambda: rtdetr_kernels.ms_deform_attn(value, shapes, loc, w)})
    (gv, _, gl, gw), _ = _with_grad(args)
    grad = torch.randn_like(rtdetr.ops.deformable_attention_core_func(value, shapes, loc, w))

    def msda_fb(fn):
        def run():
            gv.grad = gl.grad = gw.grad = None
            fn(gv, shapes, gl, gw).backward(grad)
        return run

    add("ms_deform_attn", shape, "forward+backward", {
        "reference": msda_fb(rtdetr.ops.deformable_attention_core_func), "ours": msda_fb(rtdetr_kernels.ms_deform_attn)})

    mha, x, pos = seen["aifi"]
    shape = f"x {list(x.shape)}, {mha.num_heads} heads"
    params = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    with torch.no_grad():
        add("aifi_attention", shape, "forward", {
            "reference": lambda: mha(x + pos, x + pos, value=x, need_weights=False)[0],
            "ours": lambda: rtdetr_kernels.aifi_attention(x, pos, *params, mha.num_heads)})
    xg = x.detach().clone().requires_grad_(True)
    gy = torch.randn_like(x)

    def aifi_ref():
        xg.grad = None
        mha(xg + pos, xg + pos, value=xg, need_weights=False)[0].backward(gy)

    def aifi_ours():
        xg.grad = None
        rtdetr_kernels.aifi_attention(xg, pos, *params, mha.num_heads).backward(gy)

    add("aifi_attention", shape, "forward+backward", {"reference": aifi_ref, "ours": aifi_ours})
    mha.zero_grad(set_to_none=True)

    select, memory, logits, coords, k = seen["topk"]
    shape = f"logits {list(logits.shape)}, k {k}, gather memory {list(memory.shape[-1:])} + logits + boxes"
    add("topk_select", shape, "forward", {
        "reference": lambda: select(memory, logits, coords, k),
        "ours": lambda: rtdetr_kernels.topk_select(logits, k, gather=(memory, logits, coords))})
    return rows


def end_to_end(model, images: torch.Tensor, targets, criterion, budget: float = 2.0) -> List[Dict]:
    """Inference at batch 1 (eval, no grad) and one training step's forward + loss + backward at the training batch,
    unpatched vs patched (``rtdetr_kernels.patch``: MSDA, attention, top-K) on a copy with the same weights."""
    device = images.device
    rows = []
    ours = copy.deepcopy(model)
    handle = rtdetr_kernels.patch(ours)

    def infer(m):
        def run():
            with torch.no_grad():
                m(images[:1])
        return run

    def step(m):
        def run():
            m.train()
            losses = criterion(m(images, targets), targets)
            sum(losses.values()).backward()
            m.zero_grad(set_to_none=True)
        return run

    model.eval()
    ours.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm running stats move in train mode
    try:
        t = timeit({"reference": infer(model), "ours": infer(ours)}, device, budget)
        rows.append(_row("inference", f"batch 1, {images.shape[-2]}x{images.shape[-1]}", t))
        t = timeit({"reference": step(model), "ours": step(ours)}, device, budget, min_rounds=3)
        rows.append(_row("training step (forward + loss + backward)", f"batch {len(images)}, "
                         f"{images.shape[-2]}x{images.shape[-1]}", t))
    finally:
        handle.revert()
        model.load_state_dict(state)
        model.eval()
    return rows


def _row(what, shape, t):
    ref, ours = t["reference"]["median_s"], t["ours"]["median_s"]
    return {"what": what, "shape": shape, "reference_ms": ref * 1e3, "ours_ms": ours * 1e3,
            "speedup": ref / ours if ours > 0 else float("nan"), "rounds": t["ours"]["rounds"]}
