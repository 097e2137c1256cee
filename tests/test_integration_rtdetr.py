"""The RT-DETR patcher on a stand-in for the model's MSDeformableAttention (the reference model in
rtdetr/ has not landed yet): the module calls its sampling core through `ms_deformable_attn_core`,
as the official code does; patching must give the grid_sample results and gradients, and revert."""

import pytest
import torch
from torch import nn

from rtdetr_kernels.integrations.rtdetr import apply_to_rtdetr
from rtdetr_kernels.ms_deform_attn.reference import ms_deform_attn_grid_sample

SHAPES = [(12, 10), (6, 5), (3, 3)]


class CrossAttention(nn.Module):
    """RT-DETR v1 decoder cross-attention, reduced to what touches the sampling core."""

    def __init__(self, dim=64, heads=8, levels=3, points=4):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.ms_deformable_attn_core = ms_deform_attn_grid_sample

    def forward(self, query, reference_points, value, shapes):
        N, Lq, _ = query.shape
        v = self.value_proj(value).view(N, value.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).view(N, Lq, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(N, Lq, self.heads, self.levels * self.points).softmax(-1)
        weights = weights.view(N, Lq, self.heads, self.levels, self.points)
        xy, wh = reference_points[:, :, None, None, None, :2], reference_points[:, :, None, None, None, 2:]
        locations = xy + offsets / self.points * wh * 0.5
        return self.output_proj(self.ms_deformable_attn_core(v, shapes, locations, weights))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttention() for _ in range(2))

    def forward(self, query, reference_points, value):
        for layer in self.layers:
            query = query + layer(query, reference_points, value, SHAPES)
        return query


def _inputs():
    S = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 11, 64, dtype=torch.float64, requires_grad=True)
    boxes = torch.cat([torch.rand(2, 11, 2) * 0.8 + 0.1, torch.rand(2, 11, 2) * 0.3 + 0.05], -1).double()
    value = torch.randn(2, S, 64, dtype=torch.float64, requires_grad=True)
    return query, boxes, value


@pytest.mark.parametrize("backend", [None, "reference"])
def test_patched_decoder_matches_grid_sample_and_reverts(backend):
    model = Decoder().double()
    query, boxes, value = _inputs()
    expected = model(query, boxes, value)
    expected_grads = torch.autograd.grad(expected.square().sum(), [query, value, *model.parameters()])

    patch = apply_to_rtdetr(model, backend=backend)
    assert len(patch) == 2
    assert all(layer.ms_deformable_attn_core is not ms_deform_attn_grid_sample for layer in model.layers)
    got = model(query, boxes, value)
    got_grads = torch.autograd.grad(got.square().sum(), [query, value, *model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)

    patch.revert()
    assert all(layer.ms_deformable_attn_core is ms_deform_attn_grid_sample for layer in model.layers)
    assert set(model.state_dict()) == set(Decoder().state_dict())


def test_patching_a_model_without_msda_is_an_error():
    with pytest.raises(ValueError, match="ms_deformable_attn_core"):
        apply_to_rtdetr(nn.Linear(2, 2))
