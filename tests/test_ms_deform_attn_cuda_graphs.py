"""CUDA-graph capture of ms_deform_attn forward and backward (GPU only): no host sync, no
data-dependent allocation, so a captured graph replays on new inputs and matches eager."""

import pytest
import torch

import rtdetr_kernels
from helpers import cuda_graph_replays, deterministic_algorithms
from rtdetr_kernels import backends

SHAPES = [(20, 20), (10, 10), (5, 5)]
GPU_BACKENDS = ["cuda", "triton", "reference"]


def _inputs(seed, N=2, Lq=37, M=8, D=32, P=4):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(N, S, M, D, generator=gen)
    loc = torch.rand(N, Lq, M, len(SHAPES), P, 2, generator=gen) * 1.1 - 0.05
    weights = torch.rand(N, Lq, M, len(SHAPES), P, generator=gen).softmax(-1)
    grad = torch.randn(N, Lq, M * D, generator=gen)
    return [t.cuda() for t in (value, loc, weights, grad)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_capture_and_replay_forward_backward(backend, deterministic):
    reason = backends.why_not(backend, backends.Call("ms_deform_attn", "cuda", (torch.float32,) * 3))
    if reason is not None:
        pytest.skip(reason)
    if deterministic and backend == "reference":
        pytest.skip("the reference's deterministic backward relies on torch's own kernels")
    with deterministic_algorithms(deterministic):
        static = [t.clone() for t in _inputs(0)]
        leaves = [t.requires_grad_() for t in static[:3]]

        def step():
            out = rtdetr_kernels.ms_deform_attn(leaves[0], SHAPES, leaves[1], leaves[2], backend=backend)
            return (out,) + torch.autograd.grad(out, leaves, static[3])

        for captured, expected in cuda_graph_replays(step, static, _inputs):
            for got, exp in zip(captured, expected):
                torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
