"""rtdetr_kernels.patch on ultralytics 8.4.190's RT-DETR (the ``ultralytics`` family).

A tiny random RTDETRDetectionModel (the research note's dict config, 0.5 M parameters, 128 px) runs
patched and unpatched: eval outputs, a training step's loss and every parameter gradient, state-dict
keys, revert, patching twice, the wrapper, copies and pickles, the fallbacks, and the whole-model
capture (``torch._dynamo.explain``).

Importing ultralytics has process-wide effects: it sets ``OMP_NUM_THREADS=1`` when unset, and sets
torch's and NumPy's print options, OpenCV's thread count, warning filters and a few environment
variables. The ``ultra`` fixture imports it in this process with ``OMP_NUM_THREADS`` set to torch's
current thread count (so nothing changes torch's threads), ``YOLO_OFFLINE=1`` (no DNS probe) and
``YOLO_CONFIG_DIR`` in a temporary folder (nothing under $HOME), and restores the environment, the
print options, OpenCV's threads and the warning filters afterwards, so the rest of the suite runs as
if ultralytics had never been imported.

Tolerances: patched and unpatched compute the same float32 math with other summation orders (fused
attention, the MSDA kernel). Measured here: outputs within 1e-6, the loss (37.5) within 4e-6, gradients
within 2.1e-6 absolute where the largest is 3.4. Outputs are compared at 1e-4, gradients at
atol = 1e-5 x the largest gradient (16x the measured error) and rtol 1e-3: a wrong index or a dropped
term changes them at the 1e-2 level. (A per-parameter relative bound would be wrong: some gradients
are rounding noise.)
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch

import rtdetr_kernels

# find_spec, not importorskip: importing ultralytics at collection would skip the fixture's precautions
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics is a test dependency of the ultralytics family", allow_module_level=True)

ATOL = RTOL = 1e-4
_THREADS = torch.get_num_threads()

CFG = {
    "nc": 5,
    "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [32, 3, 2]],
                 [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [64, 3, 2]]],
    # RTDETRDecoder args after nc: hidden 64, 30 queries, 4 points, 4 heads, 2 decoder layers
    "head": [[-1, 1, "AIFI", [128, 4]], [[2, 3, 5], 1, "RTDETRDecoder", [5, 64, 30, 4, 4, 2]]],
}


@contextlib.contextmanager
def _import_ultralytics_quietly():
    """Import ultralytics leaving the process as it was (see the module docstring)."""
    import cv2

    threads = torch.get_num_threads()
    env = dict(os.environ)
    torch_print = {k: getattr(torch._tensor_str.PRINT_OPTS, k)
                   for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    np_print = np.get_printoptions()
    cv2_threads = cv2.getNumThreads()
    filters = list(warnings.filters)
    with tempfile.TemporaryDirectory() as config_dir:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_CONFIG_DIR"] = config_dir
        try:
            import ultralytics  # noqa: F401
            from ultralytics.nn import tasks

            yield tasks
        finally:
            os.environ.clear()
            os.environ.update(env)
            torch.set_printoptions(**torch_print)
            np.set_printoptions(**np_print)
            cv2.setNumThreads(cv2_threads)
            warnings.filters[:] = filters
            assert torch.get_num_threads() == threads


@pytest.fixture(scope="module")
def ultra():
    threads = torch.get_num_threads()
    with _import_ultralytics_quietly() as tasks:
        yield tasks
    assert torch.get_num_threads() == threads


def _model(ultra, seed=0):
    torch.manual_seed(seed)
    m = ultra.RTDETRDetectionModel(copy.deepcopy(CFG), ch=3, verbose=False)
    m.nc = 5
    # upstream initialises the sampling offsets' and attention weights' matrices and the box heads' last
    # layers to zero; perturb every parameter so that each path computes something input-dependent
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _images(n=2, size=128, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _batch(img, seed=2):
    g = torch.Generator().manual_seed(seed)
    counts = [3, 1, 2][: img.shape[0]]
    idx = torch.cat([torch.full((c,), i, dtype=torch.float32) for i, c in enumerate(counts)])
    n = len(idx)
    xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return {"img": img, "batch_idx": idx, "cls": torch.randint(0, 5, (n, 1), generator=g).float(),
            "bboxes": torch.cat([xy, wh], 1)}


def _eval(m, x):
    with torch.no_grad():
        y, (dec_bboxes, dec_scores, enc_bboxes, enc_scores, _) = m.eval()(x)
    return y, dec_bboxes, dec_scores, enc_bboxes, enc_scores


def _train_step(m, batch, seed=3):
    m.train()
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # get_cdn_group's label and box noise
    loss, _ = m.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


class _Calls:
    """Counts calls of the upstream code a patch replaces (it must not run while patched)."""

    def __init__(self, ultra, monkeypatch):
        from ultralytics.nn.modules import head, transformer

        self.counts = {"msda": 0, "mha": 0, "topk": 0}
        core = transformer.multi_scale_deformable_attn_pytorch
        mha = torch.nn.MultiheadAttention.forward
        grouped = head.Detect._grouped_topk

        def count(kind, fn):
            def wrapped(*a, **k):
                self.counts[kind] += 1
                return fn(*a, **k)
            return wrapped

        monkeypatch.setattr(transformer, "multi_scale_deformable_attn_pytorch", count("msda", core))
        monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", count("mha", mha))
        monkeypatch.setattr(head.Detect, "_grouped_topk", staticmethod(count("topk", grouped)))

    def reset(self):
        self.counts = dict.fromkeys(self.counts, 0)


def test_import_leaves_the_process_alone(ultra):
    # ultralytics' own default would have been OMP_NUM_THREADS=1; the fixture also checks around the import
    assert torch.get_num_threads() == _THREADS
    from ultralytics.utils import ONLINE, SETTINGS

    assert not ONLINE  # YOLO_OFFLINE: no DNS probe
    assert str(SETTINGS.file).startswith(tempfile.gettempdir())  # its settings file is not under $HOME


@pytest.mark.parametrize("backend", [None, "reference"])
def test_eval_parity_and_revert(ultra, backend, monkeypatch):
    calls = _Calls(ultra, monkeypatch)
    m = _model(ultra)
    x = _images()
    keys = list(m.state_dict())
    params = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _eval(m, x)
    assert calls.counts == {"msda": 2, "mha": 3, "topk": 2}

    handle = rtdetr_kernels.patch(m, backend=backend)
    assert handle.counts() == {"msda": {"MSDeformAttn": 2},
                               "attention": {"AIFI": 1, "DeformableTransformerDecoderLayer": 2},
                               "topk": {"RTDETRDecoder": 2}}
    assert list(m.state_dict()) == keys
    assert all(torch.equal(v, params[k]) for k, v in m.state_dict().items())
    calls.reset()
    out = _eval(m, x)
    assert calls.counts == {"msda": 0, "mha": 0, "topk": 0}  # every hot spot went through the ops
    assert out[0].shape == (2, 30, 6)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    # labels and the query order are exact: no two scores tie for these random weights
    assert torch.equal(out[0][..., 5], ref[0][..., 5])

    assert rtdetr_kernels.patch(m) is handle  # twice: a no-op returning the first handle
    handle.revert()
    assert not any(a in mod.__dict__ for mod in m.modules() for a in ("forward", "postprocess", "_get_decoder_input"))
    again = _eval(m, x)
    assert calls.counts["mha"] == 3
    for a, b in zip(again, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["msda", "attention", "topk"])
def test_each_kind_alone(ultra, kind):
    m = _model(ultra, seed=4)
    x = _images(n=1, size=160, seed=5)  # odd feature sizes: 20x20 -> 10x10, 5x5 levels
    ref = _eval(m, x)
    handle = rtdetr_kernels.patch(m, **{k: k == kind for k in ("msda", "attention", "topk")})
    assert list(handle.counts()) == [kind]
    for a, b in zip(_eval(m, x), ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    handle.revert()


def test_training_step_loss_and_gradients(ultra, monkeypatch):
    calls = _Calls(ultra, monkeypatch)
    m = _model(ultra, seed=6)
    batch = _batch(_images(n=3, seed=7))
    loss_ref, grads_ref = _train_step(m, batch)
    handle = rtdetr_kernels.patch(m)
    calls.reset()
    loss, grads = _train_step(m, batch)
    assert calls.counts == {"msda": 0, "mha": 0, "topk": 0}
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=RTOL)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == len([p for p in m.parameters() if p.requires_grad])  # every parameter gets one
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], atol=1e-5 * scale, rtol=1e-3, msg=lambda s: f"{name}: {s}")
    handle.revert()


def test_dropout_in_training_falls_back(ultra, monkeypatch):
    calls = _Calls(ultra, monkeypatch)
    m = _model(ultra, seed=8)
    m.model[5].ma.dropout = 0.1  # AIFI's attention dropout: the op has none
    handle = rtdetr_kernels.patch(m)
    calls.reset()
    _train_step(m, _batch(_images(n=2, seed=9)))
    assert calls.counts == {"msda": 0, "mha": 1, "topk": 0}  # only AIFI ran the original
    calls.reset()
    ref = _eval(m, _images(n=1))  # in eval the dropout is off: patched again
    assert calls.counts["mha"] == 0 and ref[0].shape == (1, 30, 6)
    handle.revert()


def test_export_mode_keeps_the_original(ultra, monkeypatch):
    calls = _Calls(ultra, monkeypatch)
    m = _model(ultra, seed=10)
    head = m.model[-1]
    head.export = True  # what ultralytics' exporter sets (TensorRT's grouped top-k, max_det)
    head.max_det = 7
    x = _images(n=1, seed=11)
    with torch.no_grad():
        ref = m.eval()(x)
    rtdetr_kernels.patch(m)
    calls.reset()
    with torch.no_grad():
        out = m(x)
    assert calls.counts["topk"] == 2 and out.shape == (1, 7, 6)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("ref_dims", [2, 4])
def test_msdeformattn_reference_points_and_padding_mask(ultra, ref_dims):
    from ultralytics.nn.modules.transformer import MSDeformAttn

    torch.manual_seed(12)
    attn = MSDeformAttn(d_model=48, n_levels=3, n_heads=6, n_points=3)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    shapes = [[9, 7], [5, 4], [3, 2]]
    S = sum(h * w for h, w in shapes)
    query = torch.randn(2, 11, 48)
    value = torch.randn(2, S, 48)
    refer = torch.rand(2, 11, 1, ref_dims)
    mask = torch.rand(2, S) < 0.3  # True = padding
    ref = attn(query, refer, value, shapes, mask)
    handle = rtdetr_kernels.patch(attn, attention=False, topk=False)
    assert handle.counts() == {"msda": {"MSDeformAttn": 1}}
    torch.testing.assert_close(attn(query, refer, value, shapes, mask), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(query, refer, value, shapes), attn.__class__.forward(attn, query, refer, value, shapes),
                               atol=1e-5, rtol=1e-5)


def test_wrapper_and_copies(ultra, tmp_path):
    import yaml
    from ultralytics import RTDETR

    path = tmp_path / "rtdetr-tiny.yaml"
    path.write_text(yaml.safe_dump(CFG))
    wrapper = RTDETR(str(path))
    net = wrapper.model
    handle = rtdetr_kernels.patch(wrapper)
    assert handle.counts()["attention"] == {"AIFI": 1, "DeformableTransformerDecoderLayer": 2}
    assert rtdetr_kernels.patch(net) is handle  # the wrapper and its .model are the same call
    assert "RTDETRDetectionModel" in handle.report()

    # a deep copy (ultralytics' EMA makes one) is patched, bound to the copy, and has no handle of its own
    twin = copy.deepcopy(net)
    layer = twin.model[-1].decoder.layers[0]
    assert layer.__dict__["forward"].obj is layer
    x = _images(n=1, seed=13)
    for a, b in zip(_eval(twin, x), _eval(net, x)):
        assert torch.equal(a, b)
    twin_handle = rtdetr_kernels.patch(twin)  # re-patches (replacing, not stacking) and can revert the copy
    assert twin_handle is not handle and sum(sum(c.values()) for c in twin_handle.counts().values()) == 7
    twin_handle.revert()
    assert "forward" not in layer.__dict__ and "forward" in net.model[-1].decoder.layers[0].__dict__

    # torch.save of a patched model stores the originals: it loads as a plain model
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert getattr(loaded, "_rtdetr_kernels_patch", None) is None
    assert not any(type(v).__name__ == "BoundPatch" for mod in loaded.modules() for v in mod.__dict__.values())
    handle.revert()
    assert getattr(net, "_rtdetr_kernels_patch", None) is None


def test_nothing_to_patch_names_the_family(ultra):
    with pytest.raises(ValueError, match="ultralytics"):
        rtdetr_kernels.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_whole_model_capture_eval(ultra):
    """The patched eval model is captured whole at fixed shapes: ``fullgraph=True`` raises at any graph
    break (``torch._dynamo.explain`` reports 0 breaks, 1 graph, patched and unpatched alike; the
    ``eager`` backend keeps the test to tracing, about 15 s here)."""
    m = _model(ultra, seed=14).eval()
    x = _images(n=1, seed=15)
    rtdetr_kernels.patch(m)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ref = m(x)[0]
            compiled = torch.compile(m, fullgraph=True, backend="eager")
            torch.testing.assert_close(compiled(x)[0], ref, atol=ATOL, rtol=RTOL)
    finally:
        torch._dynamo.reset()
