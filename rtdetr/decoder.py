"""RT-DETR decoder (``RTDETRTransformer``, v1) with the RT-DETRv2 options
(per-level point counts, ``discrete`` sampling, query-selection methods, v2 state-dict naming)."""
from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

from . import ops
from .ops import inverse_sigmoid

__all__ = ["MLP", "MSDeformableAttention", "TransformerDecoderLayer", "TransformerDecoder", "RTDETRTransformer",
           "bias_init_with_prob"]


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    return float(-math.log((1 - prior_prob) / prior_prob))


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers, act="relu"):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.act = nn.ReLU() if act == "relu" else nn.Identity()

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return x


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention.

    v1 (``version='v1'``, uniform points): the core is called as
    ``self.ms_deformable_attn_core(value [N,S,M,D], spatial_shapes, locations [N,Lq,M,L,P,2], weights [N,Lq,M,L,P])``
    and defaults to :func:`rtdetr.ops.deformable_attention_core_func`; replace the attribute to swap in a kernel.

    v2 (``version='v2'``): per-level point counts, ``num_points_scale`` buffer, and the core is
    ``partial(deformable_attention_core_func_v2, method=method)`` called with
    ``(value, spatial_shapes, locations [N,Lq,M,sum(P),2], weights [N,Lq,M,sum(P)], num_points_list)``.
    """

    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points: Union[int, Sequence[int]] = 4,
                 method="default", offset_scale=0.5, version="v1"):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError("embed_dim must be divisible by num_heads")
        if isinstance(num_points, (list, tuple)):
            if len(num_points) != num_levels:
                raise ValueError(f"num_points has {len(num_points)} entries but num_levels={num_levels}")
            num_points_list = [int(p) for p in num_points]
        else:
            num_points_list = [int(num_points)] * num_levels
        if version == "v1" and (method != "default" or len(set(num_points_list)) != 1):
            raise ValueError("per-level point counts / 'discrete' sampling need version='v2'")
        if method not in ("default", "discrete"):
            raise ValueError(f"unknown cross_attn_method {method!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points_list[0]
        self.num_points_list = num_points_list
        self.method = method
        # how `discrete` clamps x: per axis (to W-1); upstream clamps it to H-1 (see deformable_attention_core_func_v2)
        self.discrete_clamp = "per_axis"
        self.offset_scale = offset_scale
        self.version = version
        self.head_dim = embed_dim // num_heads
        self.total_points = num_heads * sum(num_points_list)
        if version == "v2":
            scale = [1.0 / n for n in num_points_list for _ in range(n)]
            self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))

        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

        if version == "v1":
            self.ms_deformable_attn_core = ops.deformable_attention_core_func
        else:
            self.ms_deformable_attn_core = functools.partial(ops.deformable_attention_core_func_v2, method=method)
        self._reset_parameters()
        if method == "discrete":
            for p in self.sampling_offsets.parameters():
                p.requires_grad_(False)

    def _reset_parameters(self):
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.reshape(self.num_heads, 1, 2).tile([1, sum(self.num_points_list), 1])
        scaling = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points_list])
        grid = grid * scaling.reshape(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def forward(self, query, reference_points, value, value_spatial_shapes, value_mask=None):
        """query [N,Lq,C]; reference_points [N,Lq,1 or L,4] (cxcywh, normalised) or [N,Lq,L,2];
        value [N,S,C]; value_spatial_shapes list of (H, W) -> [N,Lq,C]."""
        bs, lq = query.shape[:2]
        lv = value.shape[1]
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.to(value.dtype).unsqueeze(-1)
        value = value.reshape(bs, lv, self.num_heads, self.head_dim)
        total = sum(self.num_points_list)
        offsets = self.sampling_offsets(query)
        weights = F.softmax(self.attention_weights(query).reshape(bs, lq, self.num_heads, total), dim=-1)

        if self.version == "v1":
            L, P = self.num_levels, self.num_points
            offsets = offsets.reshape(bs, lq, self.num_heads, L, P, 2)
            weights = weights.reshape(bs, lq, self.num_heads, L, P)
            if reference_points.shape[-1] == 2:
                norm = torch.tensor(value_spatial_shapes, device=query.device).flip([1]).reshape(1, 1, 1, L, 1, 2)
                loc = reference_points.reshape(bs, lq, 1, L, 1, 2) + offsets / norm
            elif reference_points.shape[-1] == 4:
                loc = (reference_points[:, :, None, :, None, :2]
                       + offsets / P * reference_points[:, :, None, :, None, 2:] * self.offset_scale)
            else:
                raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
            out = self.ms_deformable_attn_core(value, value_spatial_shapes, loc, weights)
        else:
            offsets = offsets.reshape(bs, lq, self.num_heads, total, 2)
            if reference_points.shape[-1] == 2:
                norm = torch.tensor(value_spatial_shapes, device=query.device).flip([1])
                norm = torch.cat([norm[i:i + 1].expand(n, 2) for i, n in enumerate(self.num_points_list)])
                ref = reference_points.reshape(bs, lq, 1, -1, 2)
                if ref.shape[3] == 1:
                    ref = ref.expand(bs, lq, 1, total, 2)
                else:
                    ref = torch.cat([ref[:, :, :, i:i + 1].expand(-1, -1, -1, n, -1)
                                     for i, n in enumerate(self.num_points_list)], dim=3)
                loc = ref + offsets / norm.reshape(1, 1, 1, total, 2)
            elif reference_points.shape[-1] == 4:
                scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)
                off = offsets * scale * reference_points[:, :, None, :, 2:] * self.offset_scale
                loc = reference_points[:, :, None, :, :2] + off
            else:
                raise ValueError(f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}")
            out = self.ms_deformable_attn_core(value, value_spatial_shapes, loc, weights, self.num_points_list)
        return self.output_proj(out)


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model=256, n_head=8, dim_feedforward=1024, dropout=0.0, activation="relu", n_levels=4,
                 n_points: Union[int, Sequence[int]] = 4, cross_attn_method="default", version="v1"):
        super().__init__()
        self.version = version
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points, method=cross_attn_method,
                                                version=version)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        if version == "v2":
            init.xavier_uniform_(self.linear1.weight)
            init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt, reference_points, memory, memory_spatial_shapes, attn_mask=None, memory_mask=None,
                query_pos_embed=None):
        q = k = tgt if query_pos_embed is None else tgt + query_pos_embed
        tgt2, _ = self.self_attn(q, k, value=tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        query = tgt if query_pos_embed is None else tgt + query_pos_embed
        tgt2 = self.cross_attn(query, reference_points, memory, memory_spatial_shapes, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        tgt = tgt + self.dropout4(tgt2)
        if self.version == "v1":  # fp16 overflow guard (official v1, PR #464); v2 has none
            tgt = tgt.clamp(min=-65504, max=65504)
        return self.norm3(tgt)


class TransformerDecoder(nn.Module):
    def __init__(self, hidden_dim, decoder_layer, num_layers, eval_idx=-1):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def forward(self, tgt, ref_points_unact, memory, memory_spatial_shapes, bbox_head, score_head, query_pos_head,
                attn_mask=None, memory_mask=None):
        """Returns (boxes [n_out,N,Q,4], logits [n_out,N,Q,C]); eval: only layer ``eval_idx`` (loop stops there);
        training: every layer (look-forward-twice boxes)."""
        output = tgt
        out_boxes, out_logits = [], []
        ref_detach = torch.sigmoid(ref_points_unact)
        ref = ref_detach
        for i, layer in enumerate(self.layers):
            query_pos = query_pos_head(ref_detach)
            output = layer(output, ref_detach.unsqueeze(2), memory, memory_spatial_shapes, attn_mask, memory_mask,
                           query_pos)
            inter_ref = torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_detach))
            if self.training:
                out_logits.append(score_head[i](output))
                if i == 0:
                    out_boxes.append(inter_ref)
                else:
                    out_boxes.append(torch.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref)))
            elif i == self.eval_idx:
                out_logits.append(score_head[i](output))
                out_boxes.append(inter_ref)
                break
            ref = inter_ref
            ref_detach = inter_ref.detach() if self.training else inter_ref
        return torch.stack(out_boxes), torch.stack(out_logits)


class RTDETRTransformer(nn.Module):
    """Query selection + deformable decoder.  Anchors are generated per input size (cached per shape),
    i.e. the official behaviour with ``eval_spatial_size: ~``; with ``version='v2'`` the 640x640 anchors are
    additionally registered as the (persistent) ``anchors``/``valid_mask`` buffers of the v2 state dict."""

    def __init__(self, num_classes=80, hidden_dim=256, num_queries=300, feat_channels=(512, 1024, 2048),
                 feat_strides=(8, 16, 32), num_levels=3, num_points: Union[int, Sequence[int]] = 4, nhead=8,
                 num_layers=6, dim_feedforward=1024, dropout=0.0, activation="relu", num_denoising=100,
                 label_noise_ratio=0.5, box_noise_scale=1.0, learnt_init_query=False, eval_idx=-1, eps=1e-2,
                 aux_loss=True, cross_attn_method="default", query_select_method="default", version="v1",
                 eval_spatial_size=(640, 640)):
        super().__init__()
        feat_channels = list(feat_channels)
        feat_strides = list(feat_strides)
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError("inconsistent feat_channels / feat_strides / num_levels")
        if query_select_method not in ("default", "one2many", "agnostic"):
            raise ValueError(f"unknown query_select_method {query_select_method!r}")
        if query_select_method != "default" and version != "v2":
            raise ValueError("query_select_method other than 'default' needs version='v2'")
        for _ in range(num_levels - len(feat_strides)):
            feat_strides.append(feat_strides[-1] * 2)
        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_layers = num_layers
        self.aux_loss = aux_loss
        self.version = version
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self._anchor_cache: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        # the official code builds anchors in float32 whatever the model dtype; set to None to build them in the
        # memory dtype instead (what transformers does; only matters for float64 comparisons)
        self.anchor_dtype: Optional[torch.dtype] = torch.float32

        if version == "v2" and self.eval_spatial_size:
            anchors, valid_mask = self._generate_anchors(self._eval_shapes())
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid_mask)

        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)), ("norm", nn.BatchNorm2d(hidden_dim))])))
        c = feat_channels[-1]
        for _ in range(num_levels - len(feat_channels)):
            self.input_proj.append(nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c, hidden_dim, 3, 2, padding=1, bias=False)),
                ("norm", nn.BatchNorm2d(hidden_dim))])))
            c = hidden_dim

        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels,
                                        num_points, cross_attn_method=cross_attn_method, version=version)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_layers, eval_idx)

        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            if version == "v2":
                with torch.no_grad():
                    init.normal_(self.denoising_class_embed.weight[:-1])

        self.learnt_init_query = learnt_init_query
        if learnt_init_query:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        if version == "v1":
            self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        else:
            self.enc_output = nn.Sequential(OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)),
                                                         ("norm", nn.LayerNorm(hidden_dim))]))
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_layers)])
        self.dec_bbox_head = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_layers)])
        self._reset_parameters()

    # ------------------------------------------------------------------ init
    def _reset_parameters(self):
        bias = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for cls_, reg_ in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(cls_.bias, bias)
            init.constant_(reg_.layers[-1].weight, 0)
            init.constant_(reg_.layers[-1].bias, 0)
        init.xavier_uniform_(self.enc_output[0].weight)
        if self.learnt_init_query:
            init.xavier_uniform_(self.tgt_embed.weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        if self.version == "v2":
            for m in self.input_proj:
                init.xavier_uniform_(m[0].weight)

    # ------------------------------------------------------------------ helpers
    def _eval_shapes(self):
        h, w = self.eval_spatial_size
        return [(int(h / s), int(w / s)) for s in self.feat_strides]

    def _get_encoder_input(self, feats: List[torch.Tensor]):
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        n_src = len(proj)
        for i in range(n_src, self.num_levels):
            proj.append(self.input_proj[i](feats[-1] if i == n_src else proj[-1]))
        flat, shapes = [], []
        for f in proj:
            _, _, h, w = f.shape
            flat.append(f.flatten(2).permute(0, 2, 1))
            shapes.append((int(h), int(w)))
        return torch.cat(flat, 1), shapes

    def _generate_anchors(self, spatial_shapes, grid_size=0.05, dtype=torch.float32, device=None):
        """Anchors as logits [1, S, 4] (invalid ones = +inf) and valid mask [1, S, 1] (bool); float32 like official."""
        anchors = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            gy, gx = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
            xy = (torch.stack([gx, gy], -1).unsqueeze(0) + 0.5) / torch.tensor([w, h], dtype=dtype)
            wh = torch.ones_like(xy) * grid_size * (2.0 ** lvl)
            anchors.append(torch.cat([xy, wh], -1).reshape(-1, h * w, 4))
        anchors = torch.cat(anchors, 1)
        if device is not None:
            anchors = anchors.to(device)
        valid = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdim=True)
        anchors = torch.log(anchors / (1 - anchors))
        anchors = torch.where(valid, anchors, torch.inf)
        return anchors, valid

    def _anchors_for(self, spatial_shapes, device, dtype):
        dtype = self.anchor_dtype or dtype
        key = (tuple(spatial_shapes), str(device), dtype)
        hit = self._anchor_cache.get(key)
        if hit is None:
            hit = self._generate_anchors(spatial_shapes, dtype=dtype, device=device)
            self._anchor_cache[key] = hit
        return hit

    def _select_topk(self, memory: torch.Tensor, outputs_logits: torch.Tensor, outputs_coords_unact: torch.Tensor,
                     topk: int):
        """Query selection: score = max class logit per token (v2 'one2many': top-k over token x class,
        'agnostic': the single logit), ``topk`` tokens, then gather memory / logits / unactivated boxes.
        Returns (topk_memory [N,K,D], topk_logits [N,K,C], topk_coords_unact [N,K,4])."""
        if self.query_select_method == "default":
            _, ind = torch.topk(outputs_logits.max(-1).values, topk, dim=-1)
        elif self.query_select_method == "one2many":
            _, ind = torch.topk(outputs_logits.flatten(1), topk, dim=-1)
            ind = ind // self.num_classes
        else:
            _, ind = torch.topk(outputs_logits.squeeze(-1), topk, dim=-1)
        ind = ind.unsqueeze(-1)
        coords = outputs_coords_unact.gather(1, ind.expand(-1, -1, outputs_coords_unact.shape[-1]))
        logits = outputs_logits.gather(1, ind.expand(-1, -1, outputs_logits.shape[-1]))
        mem = memory.gather(1, ind.expand(-1, -1, memory.shape[-1]))
        return mem, logits, coords

    def _get_decoder_input(self, memory, spatial_shapes, denoising_class=None, denoising_bbox_unact=None):
        if (self.version == "v2" and not self.training and self.eval_spatial_size
                and list(spatial_shapes) == self._eval_shapes()):
            anchors, valid_mask = self.anchors, self.valid_mask
        else:
            anchors, valid_mask = self._anchors_for(spatial_shapes, memory.device, memory.dtype)
        memory = valid_mask.to(memory.dtype) * memory
        output_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(output_memory)
        enc_coords_unact = self.enc_bbox_head(output_memory) + anchors.to(memory.dtype)
        topk_memory, topk_logits, topk_coords = self._select_topk(output_memory, enc_logits, enc_coords_unact,
                                                                  self.num_queries)
        enc_topk_bboxes = torch.sigmoid(topk_coords)
        if self.learnt_init_query:
            target = self.tgt_embed.weight.unsqueeze(0).tile([memory.shape[0], 1, 1])
        else:
            target = topk_memory.detach()
        ref_unact = topk_coords.detach()
        if denoising_bbox_unact is not None:
            ref_unact = torch.cat([denoising_bbox_unact, ref_unact], 1)
            target = torch.cat([denoising_class, target], 1)
        return target, ref_unact, enc_topk_bboxes, topk_logits

    # ------------------------------------------------------------------ forward
    def forward(self, feats: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        memory, spatial_shapes = self._get_encoder_input(feats)
        dn_cls = dn_box = attn_mask = dn_meta = None
        if self.training and self.num_denoising > 0 and targets is not None:
            from .denoising import get_contrastive_denoising_training_group
            dn_cls, dn_box, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale)
        target, ref_unact, enc_topk_bboxes, enc_topk_logits = self._get_decoder_input(memory, spatial_shapes,
                                                                                      dn_cls, dn_box)
        out_boxes, out_logits = self.decoder(target, ref_unact, memory, spatial_shapes, self.dec_bbox_head,
                                             self.dec_score_head, self.query_pos_head, attn_mask=attn_mask)
        if self.training and dn_meta is not None:
            dn_out_boxes, out_boxes = torch.split(out_boxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = torch.split(out_logits, dn_meta["dn_num_split"], dim=2)
        out = {"pred_logits": out_logits[-1], "pred_boxes": out_boxes[-1]}
        if self.training and self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(out_logits[:-1], out_boxes[:-1])]
            enc_aux = [{"pred_logits": enc_topk_logits, "pred_boxes": enc_topk_bboxes}]
            if self.version == "v1":  # v1 appends the encoder top-k output to aux_outputs
                out["aux_outputs"].extend(enc_aux)
            else:
                out["enc_aux_outputs"] = enc_aux
                out["enc_meta"] = {"class_agnostic": self.query_select_method == "agnostic"}
            if dn_meta is not None:
                out["dn_aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                         for a, b in zip(dn_out_logits, dn_out_boxes)]
                out["dn_meta"] = dn_meta
        return out
