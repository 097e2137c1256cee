"""DistributedDataParallel (gloo, 2 CPU processes) gives the gradients of one process on the combined batch.

Each rank builds the same seeded ``rtdetr_r18vd`` (2 decoder layers, 3 classes), runs the training forward on its
half of a 4-image batch, computes the set criterion and back-propagates through DDP; rank 0's all-reduced
gradients are written to a file and compared here with the gradients of an identical model trained on the
whole batch in this (non-distributed) process.

What makes the comparison exact (up to float64 summation order):

* float64 everywhere (``model.double()``, double images and boxes), so reordering of sums is ~1e-16 relative.
* BatchNorm (trainable in the r18vd backbone, and always in the encoder / decoder input projections) is put in
  eval mode: with batch statistics the per-rank halves would be normalised differently from the full batch.
  Its affine parameters keep ``requires_grad`` and are still compared.
* Contrastive denoising stays on (so the ``_dn_`` losses and ``denoising_class_embed`` are covered) but with
  ``label_noise_ratio = box_noise_scale = 0``: the noise is drawn from the global RNG per call, so two half
  batches would draw different noise than one full batch.  Without noise the DN queries are a deterministic
  function of each image's targets *and of the batch's largest target count* (padding and number of groups),
  so every image here has at most 3 boxes and each half contains an image with 3.
* The two halves hold different numbers of boxes (6 and 4): the criterion divides by the number of boxes
  all-reduced over ranks and divided by the world size (official behaviour), so each rank's loss is
  ``sum_i l_i / (10 / 2)`` and DDP's gradient mean equals the gradient of ``sum_i l_i / 10`` of the full batch.
  A criterion normalising by its local count (6 resp. 4) would fail this test.
* The Hungarian matching and top-k query selection are per image, hence identical in both runs.
"""
import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("scipy")

import rtdetr  # noqa: E402

WORLD = 2
SIZE = 64
NUM_CLASSES = 3


def _build():
    torch.manual_seed(0)
    model = rtdetr.build_model("rtdetr_r18vd", num_classes=NUM_CLASSES, num_layers=2)
    dec = model.decoder
    # build_model fixes 300 queries / 100 denoising queries; 64x64 inputs give only 84 memory tokens
    dec.num_queries = 30
    dec.num_denoising = 30
    dec.label_noise_ratio = 0.0
    dec.box_noise_scale = 0.0
    dec.anchor_dtype = None  # anchors in float64 too
    model = model.double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()  # running statistics, not batch statistics (see module docstring)
    return model


def _batch():
    g = torch.Generator().manual_seed(123)
    images = torch.rand(4, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    counts = [3, 3, 3, 1]  # rank 0: images 0, 1 (6 boxes); rank 1: images 2, 3 (4 boxes)
    targets = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([cxcy, wh], 1)})
    return images, targets


def _step(model, images, targets):
    criterion = rtdetr.build_criterion(num_classes=NUM_CLASSES)
    outputs = model(images, targets)
    losses = criterion(outputs, targets)
    total = sum(losses.values())
    total.backward()
    return float(total.detach()), sorted(losses)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _build()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        images, targets = _batch()
        half = slice(2 * rank, 2 * rank + 2)
        loss, keys = _step(ddp, images[half], targets[half])
        grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()
                 if p.requires_grad}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"grads": grads, "loss": loss, "keys": keys}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    assert dist.is_available() and dist.is_gloo_available()
    t0 = time.time()
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = []
    for r in range(WORLD):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    t_ddp = time.time() - t0

    assert not dist.is_initialized()
    model = _build()
    images, targets = _batch()
    full_loss, keys = _step(model, images, targets)
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    assert any("_dn_" in k for k in keys) and keys == ranks[0]["keys"] == ranks[1]["keys"]
    missing = [n for n, g in ref.items() if g is None]
    assert not missing, f"parameters without gradient in the full-batch run: {missing}"

    scale = max(float(g.abs().max()) for g in ref.values())
    worst_abs, worst_rel = 0.0, 0.0
    for r, res in enumerate(ranks):
        assert set(res["grads"]) == set(ref)
        for n, g_ref in ref.items():
            g = res["grads"][n]
            assert g is not None, f"rank {r}: no gradient for {n}"
            # float64: the only differences are summation orders (batched kernels over 2 vs 4 images, the
            # all-reduce mean); 1e-9 relative to the largest gradient is ~1e7 ulps of headroom but far below
            # any real mismatch (BN batch statistics, local box normalisation or DN noise give >= 1e-3)
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"rank {r} {n}: {m}")
            diff = (g - g_ref).abs()
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float((diff / g_ref.abs().clamp(min=1e-6 * scale)).max()))
    # per-rank losses are sum_i l_i / 5 over their halves; the full loss is sum_i l_i / 10
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / WORLD - full_loss) < 1e-9 * abs(full_loss)
    nonzero = sum(int(g.abs().max() > 0) for g in ref.values())
    assert nonzero > 0.9 * len(ref)  # the comparison is not vacuous
    print(f"DDP {t_ddp:.1f}s; {len(ref)} grads, max |g| {scale:.3e}, max abs diff {worst_abs:.3e}, "
          f"max rel diff {worst_rel:.3e}")
