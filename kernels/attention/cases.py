"""AIFI attention's representative call for ``python -m rtdetr_kernels check`` and its
compute-sanitizer cases (run by bench/sanitize_cases.py on the cuda and triton backends)."""

from __future__ import annotations

from typing import List

import torch

from .._cases import DTYPES, Case, Sample, backward_both_modes, call_or_skip, sync
from .op import aifi_attention


def _params(E: int, gen: torch.Generator, dtype=torch.float64, bias: bool = True):
    scale = E ** -0.5
    w = lambda *s: torch.randn(*s, generator=gen, dtype=dtype) * scale  # noqa: E731
    b = lambda *s: torch.randn(*s, generator=gen, dtype=dtype) * 0.1 if bias else None  # noqa: E731
    return w(3 * E, E), b(3 * E), w(E, E), b(E)


def _oracle(x, pos, in_w, in_b, out_w, out_b, num_heads):
    """nn.MultiheadAttention as RT-DETR's AIFI layer calls it."""
    E = x.shape[-1]
    mha = torch.nn.MultiheadAttention(E, num_heads, batch_first=True, dtype=x.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(in_w)
        mha.in_proj_bias.copy_(in_b)
        mha.out_proj.weight.copy_(out_w)
        mha.out_proj.bias.copy_(out_b)
        return mha(x + pos, x + pos, x, need_weights=False)[0]


def sample(seed: int = 0) -> Sample:
    """The AIFI layer at 640 px (400 tokens of 256 channels, 8 heads), batch 2."""
    gen = torch.Generator().manual_seed(seed)
    N, L, E, H = 2, 400, 256, 8
    x = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    pos = torch.randn(1, L, E, generator=gen, dtype=torch.float64)
    return Sample(aifi_attention, (x, pos, *_params(E, gen), H), differentiable=(0, 1, 2, 3, 4, 5), oracle=_oracle,
                  description="N=2, L=400, E=256, 8 heads; oracle nn.MultiheadAttention")


def _case(backend: str, N: int, L: int, E: int, heads: int, dtype: str, with_pos: bool = True,
          mask: str = "none") -> Case:
    case_id = f"aifi_attention/{backend}-{dtype}-N{N}-L{L}-E{E}-h{heads}{'' if with_pos else '-nopos'}-mask{mask}"

    def run(device: str, check: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        dt = DTYPES[dtype]
        x = torch.randn(N, L, E, generator=gen).to(device=device, dtype=dt).requires_grad_()
        pos = torch.randn(1, L, E, generator=gen).to(device=device, dtype=dt).requires_grad_() if with_pos else None
        params = [p.to(device=device, dtype=dt).requires_grad_() for p in _params(E, gen, torch.float32)]
        attn_mask = None
        if mask != "none":
            blocked = torch.rand(L, L, generator=gen) < 0.3
            blocked[-1] = True  # a query that sees nothing
            attn_mask = blocked if mask == "bool" else torch.zeros(L, L).masked_fill(blocked, float("-inf"))
            attn_mask = attn_mask.to(device)
        out = call_or_skip(aifi_attention, x, pos, *params, heads, attn_mask, backend=backend)
        sync(device)
        if tuple(out.shape) != (N, L, E) or out.dtype != dt:
            raise AssertionError(f"output {tuple(out.shape)} {out.dtype} != {(N, L, E)} {dt}")
        if check and out.numel():
            ref = aifi_attention(x.detach().float(), None if pos is None else pos.detach().float(),
                                 *(p.detach().float() for p in params), heads, attn_mask, backend="reference")
            err = (out.detach().float() - ref).abs().max().item()
            if err > (1e-4 if dtype == "fp32" else 3e-2) * (1 + ref.abs().max().item()):
                raise AssertionError(f"forward differs from the reference by {err:.3g}")
        backward_both_modes(out, [x, pos, *params], device)

    return Case(case_id, "aifi_attention", backend, run, (backend, dtype), dict(N=N, L=L, E=E, heads=heads, mask=mask))


def sanitizer_cases(backend: str, quick: bool = False) -> List[Case]:
    """RT-DETR's AIFI shape in every dtype, lengths that are not tile multiples, masks, empty batch."""
    cases = [_case(backend, 2, 400, 256, 8, dtype) for dtype in (("fp32", "fp16", "bf16") if not quick else ("fp32", "bf16"))]
    cases += [_case(backend, 1, 37, 64, 2, "fp32"), _case(backend, 0, 16, 64, 2, "fp32"),
              _case(backend, 2, 1, 64, 2, "bf16", with_pos=False), _case(backend, 2, 77, 128, 4, "fp16", mask="bool"),
              _case(backend, 1, 300, 256, 8, "fp32", mask="float")]
    # every head-dim path of the cuda kernels: tensor cores at 16 and 64, the generic path at 24, odd lengths
    cases += [_case(backend, 1, 33, 64, 4, "bf16", mask="bool"), _case(backend, 2, 65, 128, 2, "fp16", mask="float"),
              _case(backend, 2, 45, 96, 4, "fp16", mask="bool"), _case(backend, 1, 19, 96, 4, "fp32")]
    # batch 4: enough (batch, head, row block) programs (160) for the triton kernels' large tile on GPUs up to 160 SMs
    cases += [_case(backend, 4, 300, 256, 8, "fp16", mask="bool")]
    return cases
