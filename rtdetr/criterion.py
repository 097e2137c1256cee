"""RT-DETR training losses: Hungarian matcher (focal class cost + L1 + GIoU) and the set criterion
(VFL + L1 + GIoU on the final layer, every auxiliary layer, the encoder top-k and the denoising groups)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

__all__ = ["HungarianMatcher", "SetCriterion", "box_cxcywh_to_xyxy", "pairwise_box_iou", "pairwise_generalized_box_iou",
           "build_criterion"]


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def _area(b):
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def pairwise_box_iou(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """xyxy boxes [N,4], [M,4] -> (iou [N,M], union [N,M])."""
    area_a, area_b = _area(a), _area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None] - inter
    return inter / union, union


def pairwise_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    iou, union = pairwise_box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


class HungarianMatcher(nn.Module):
    def __init__(self, weight_dict: Dict[str, float] = None, use_focal_loss: bool = True, alpha: float = 0.25,
                 gamma: float = 2.0):
        super().__init__()
        weight_dict = weight_dict or {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}
        self.cost_class = weight_dict["cost_class"]
        self.cost_bbox = weight_dict["cost_bbox"]
        self.cost_giou = weight_dict["cost_giou"]
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def forward(self, outputs, targets) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        from scipy.optimize import linear_sum_assignment
        bs, nq = outputs["pred_logits"].shape[:2]
        logits = outputs["pred_logits"].flatten(0, 1)
        prob = logits.sigmoid() if self.use_focal_loss else logits.softmax(-1)
        boxes = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        if self.use_focal_loss:
            p = prob[:, tgt_ids]
            neg = (1 - self.alpha) * (p ** self.gamma) * (-(1 - p + 1e-8).log())
            pos = self.alpha * ((1 - p) ** self.gamma) * (-(p + 1e-8).log())
            cost_class = pos - neg
        else:
            cost_class = -prob[:, tgt_ids]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        C = (self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou)
        C = C.view(bs, nq, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        out = []
        for i, c in enumerate(C.split(sizes, -1)):
            r, col = linear_sum_assignment(c[i])
            out.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
        return out


class SetCriterion(nn.Module):
    """losses: any of 'vfl', 'boxes', 'focal', 'bce'.  Output keys as the official code:
    ``loss_vfl``, ``loss_bbox``, ``loss_giou`` plus ``_aux_{i}`` (v1: decoder layers then encoder top-k;
    v2 ``enc_aux_outputs`` get ``_enc_{i}``) and ``_dn_{i}`` suffixes; each multiplied by its weight."""

    def __init__(self, matcher: HungarianMatcher, weight_dict: Dict[str, float] = None,
                 losses: Sequence[str] = ("vfl", "boxes"), alpha: float = 0.75, gamma: float = 2.0,
                 num_classes: int = 80):
        super().__init__()
        self.matcher = matcher
        self.weight_dict = weight_dict or {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes

    @staticmethod
    def _src_idx(indices):
        b = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
        s = torch.cat([s for s, _ in indices])
        return b, s

    def _target_classes(self, logits, targets, indices, idx):
        tc_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        tc = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        tc[idx] = tc_o
        return F.one_hot(tc, num_classes=self.num_classes + 1)[..., :-1], tc

    def loss_vfl(self, outputs, targets, indices, num_boxes):
        idx = self._src_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0)
        ious, _ = pairwise_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        ious = torch.diag(ious).detach()
        logits = outputs["pred_logits"]
        target, tc = self._target_classes(logits, targets, indices, idx)
        score_o = torch.zeros_like(tc, dtype=logits.dtype)
        score_o[idx] = ious.to(score_o.dtype)
        target_score = score_o.unsqueeze(-1) * target
        pred = logits.sigmoid().detach()
        weight = self.alpha * pred.pow(self.gamma) * (1 - target) + target_score
        loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_focal(self, outputs, targets, indices, num_boxes):
        idx = self._src_idx(indices)
        logits = outputs["pred_logits"]
        target, _ = self._target_classes(logits, targets, indices, idx)
        loss = torchvision.ops.sigmoid_focal_loss(logits, target.to(logits.dtype), self.alpha, self.gamma,
                                                  reduction="none")
        return {"loss_focal": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_bce(self, outputs, targets, indices, num_boxes):
        idx = self._src_idx(indices)
        logits = outputs["pred_logits"]
        target, _ = self._target_classes(logits, targets, indices, idx)
        loss = F.binary_cross_entropy_with_logits(logits, target * 1.0, reduction="none")
        return {"loss_bce": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        idx = self._src_idx(indices)
        src = outputs["pred_boxes"][idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0)
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = 1 - torch.diag(pairwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": l1, "loss_giou": giou.sum() / num_boxes}

    def get_loss(self, name, outputs, targets, indices, num_boxes):
        fn = {"vfl": self.loss_vfl, "boxes": self.loss_boxes, "focal": self.loss_focal, "bce": self.loss_bce}.get(name)
        if fn is None:
            raise ValueError(f"unknown loss {name!r}")
        return fn(outputs, targets, indices, num_boxes)

    def _weighted(self, d, suffix=""):
        return {k + suffix: v * self.weight_dict[k] for k, v in d.items() if k in self.weight_dict}

    @staticmethod
    def get_cdn_matched_indices(dn_meta, targets):
        pos_idx, n_group = dn_meta["dn_positive_idx"], dn_meta["dn_num_group"]
        out = []
        for i, t in enumerate(targets):
            n = len(t["labels"])
            device = t["labels"].device
            if n > 0:
                gt = torch.arange(n, dtype=torch.int64, device=device).tile(n_group)
                if len(pos_idx[i]) != len(gt):
                    raise RuntimeError("denoising indices do not match the targets")
                out.append((pos_idx[i], gt))
            else:
                z = torch.zeros(0, dtype=torch.int64, device=device)
                out.append((z, z))
        return out

    def forward(self, outputs, targets):
        main = {k: v for k, v in outputs.items() if "aux" not in k}
        indices = self.matcher(main, targets)
        num_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor([num_boxes], dtype=torch.float, device=outputs["pred_logits"].device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_boxes)
            world = torch.distributed.get_world_size()
        num_boxes = torch.clamp(num_boxes / world, min=1).item()

        losses = {}
        for name in self.losses:
            losses.update(self._weighted(self.get_loss(name, main, targets, indices, num_boxes)))
        for key, tag in (("aux_outputs", "_aux_"), ("enc_aux_outputs", "_enc_")):
            for i, aux in enumerate(outputs.get(key, [])):
                ind = self.matcher(aux, targets)
                for name in self.losses:
                    losses.update(self._weighted(self.get_loss(name, aux, targets, ind, num_boxes), f"{tag}{i}"))
        if "dn_aux_outputs" in outputs:
            ind = self.get_cdn_matched_indices(outputs["dn_meta"], targets)
            dn_boxes = num_boxes * outputs["dn_meta"]["dn_num_group"]
            for i, aux in enumerate(outputs["dn_aux_outputs"]):
                for name in self.losses:
                    losses.update(self._weighted(self.get_loss(name, aux, targets, ind, dn_boxes), f"_dn_{i}"))
        return losses


def build_criterion(num_classes: int = 80) -> SetCriterion:
    """The official COCO configuration: VFL(α .75, γ 2) ×1, L1 ×5, GIoU ×2; matcher class 2 / bbox 5 / giou 2."""
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, use_focal_loss=True,
                               alpha=0.25, gamma=2.0)
    return SetCriterion(matcher, {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}, ["vfl", "boxes"], alpha=0.75,
                        gamma=2.0, num_classes=num_classes)
