"""Training losses: Hungarian matcher, VFL / L1 / GIoU set criterion over final, aux, encoder and denoising outputs."""
import itertools

import pytest
import torch

pytest.importorskip("scipy")

import rtdetr  # noqa: E402
from rtdetr.criterion import (HungarianMatcher, box_cxcywh_to_xyxy, build_criterion,  # noqa: E402
                              pairwise_generalized_box_iou)


def test_matcher_is_optimal_on_small_problem():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 5, 4), "pred_boxes": torch.rand(1, 5, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 3, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.25}]
    m = HungarianMatcher()
    (rows, cols), = m(outputs, targets)
    # brute-force cost
    p = outputs["pred_logits"][0].sigmoid()[:, targets[0]["labels"]]
    a, g = 0.25, 2.0
    cls = a * (1 - p) ** g * -(p + 1e-8).log() - (1 - a) * p ** g * -(1 - p + 1e-8).log()
    box = torch.cdist(outputs["pred_boxes"][0], targets[0]["boxes"], p=1)
    giou = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"][0]),
                                         box_cxcywh_to_xyxy(targets[0]["boxes"]))
    C = 2 * cls + 5 * box + 2 * giou
    best = min(sum(C[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    got = sum(C[r, c] for r, c in zip(rows.tolist(), cols.tolist()))
    assert abs(float(got) - float(best)) < 1e-5


def test_perfect_boxes_give_zero_box_losses():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.1, 0.2]])
    logits = torch.full((1, 4, 3), -5.0)
    pred = torch.tensor([[[0.9, 0.9, 0.1, 0.1], [0.2, 0.3, 0.1, 0.2], [0.7, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    logits[0, 1, 2] = logits[0, 3, 0] = 5.0
    crit = build_criterion(num_classes=3)
    losses = crit({"pred_logits": logits, "pred_boxes": pred}, [{"labels": torch.tensor([0, 2]), "boxes": boxes}])
    assert set(losses) == {"loss_vfl", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-6
    assert losses["loss_vfl"] > 0


@pytest.mark.parametrize("name", ["rtdetr_r18vd", "rtdetrv2_r18vd"])
def test_train_step_all_losses(name):
    torch.manual_seed(0)
    model = rtdetr.build_model(name).train()
    targets = [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
               {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]
    out = model(torch.rand(2, 3, 320, 320), targets)
    losses = build_criterion()(out, targets)
    suffixes = [""] + [f"_aux_{i}" for i in range(2)] + [f"_dn_{i}" for i in range(3)]
    suffixes += ["_aux_2"] if name.startswith("rtdetr_") else ["_enc_0"]
    expected = {f"loss_{k}{s}" for k in ("vfl", "bbox", "giou") for s in suffixes}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > 0.9 * len(grads)


def test_image_without_targets():
    torch.manual_seed(0)
    model = rtdetr.build_model("rtdetr_r18vd").train()
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    out = model(torch.rand(2, 3, 320, 320), targets)
    losses = build_criterion()(out, targets)
    assert all(torch.isfinite(v) for v in losses.values())
