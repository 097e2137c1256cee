"""Top-K selection's representative call for ``python -m rtdetr_kernels check`` and its
compute-sanitizer cases (run by bench/sanitize_cases.py on the cuda and triton backends)."""

from __future__ import annotations

from typing import List

import torch

from .._cases import DTYPES, Case, Sample, backward_both_modes, call_or_skip, sync
from .op import topk_select, topk_select_flat


def _oracle(logits, k, gather):
    """torch.topk of the class max (distinct scores, so its order is the op's), then gathers."""
    scores, indices = logits.max(-1).values.topk(k, dim=1)
    return scores, indices, tuple(t.gather(1, indices.reshape(*indices.shape, *[1] * (t.dim() - 2)).expand(
        *indices.shape, *t.shape[2:])) for t in gather)


def sample(seed: int = 0) -> Sample:
    """RT-DETR's query selection at 640 px: 8400 tokens x 80 classes -> 300, gathering memory and boxes.
    Every token's class max is distinct and exact in every float dtype, so the order is exact."""
    gen = torch.Generator().manual_seed(seed)
    N, T, C, k = 2, 8400, 80, 300
    token_scores = torch.stack([torch.randperm(T, generator=gen) for _ in range(N)]).double() / 16
    logits = token_scores.unsqueeze(-1) - 1 - torch.rand(N, T, C, generator=gen, dtype=torch.float64)
    logits = logits.scatter(2, torch.randint(0, C, (N, T, 1), generator=gen), token_scores.unsqueeze(-1))
    memory = torch.randn(N, T, 256, generator=gen, dtype=torch.float64)
    boxes = torch.randn(N, T, 4, generator=gen, dtype=torch.float64)
    return Sample(topk_select, (logits, k, (memory, boxes)), differentiable=(0,), oracle=_oracle,
                  description="N=2, T=8400, C=80, k=300, gather memory [N,T,256] and boxes; oracle torch.topk")


def _case(backend: str, N: int, T: int, C: int, k: int, dtype: str, ties: bool = False, nonfinite: bool = False,
          pairs: bool = False) -> Case:
    case_id = (f"topk_select/{backend}-{dtype}-N{N}-T{T}-C{C}-k{k}{'-ties' if ties else ''}"
               f"{'-nonfinite' if nonfinite else ''}{'-pairs' if pairs else ''}")

    def run(device: str, check: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        dt = DTYPES[dtype]
        logits = torch.randn(N, T, C, generator=gen)
        if ties:
            logits = logits.round()
        if nonfinite and logits.numel():
            logits.view(-1)[::13] = float("nan")
            logits.view(-1)[1::17] = float("inf")
            logits.view(-1)[2::19] = -float("inf")
        logits = logits.to(device=device, dtype=dt).requires_grad_()
        memory = torch.randn(N, T, 33, generator=gen).to(device=device, dtype=dt).requires_grad_()
        boxes = torch.rand(N, T, 4, generator=gen).to(device).requires_grad_()
        if pairs:
            scores, _, indices, gathered = call_or_skip(topk_select_flat, logits, k, (memory, boxes), sigmoid=True,
                                                        backend=backend)
        else:
            scores, indices, gathered = call_or_skip(topk_select, logits, k, (memory, boxes), backend=backend)
        sync(device)
        if tuple(indices.shape) != (N, k) or tuple(gathered[0].shape) != (N, k, 33):
            raise AssertionError(f"indices {tuple(indices.shape)} / gathered {tuple(gathered[0].shape)} for N={N}, k={k}")
        if check:
            if pairs:
                ref = topk_select_flat(logits.detach(), k, sigmoid=True, backend="reference")[2]
            else:
                ref = topk_select(logits.detach(), k, backend="reference")[1]
            if not torch.equal(indices, ref):
                raise AssertionError("indices differ from the reference")
        backward_both_modes((scores, *gathered), (logits, memory, boxes), device)

    return Case(case_id, "topk_select", backend, run, (backend, dtype), dict(N=N, T=T, C=C, k=k))


def sanitizer_cases(backend: str, quick: bool = False) -> List[Case]:
    """RT-DETR's shape in every dtype, ties, k == T, non-finite logits, empty batch; the post-processor
    form with the sigmoid; the kernels' other paths: keys beyond shared memory (20000 candidates), k
    beyond the in-kernel sort (torch.sort finish), the thread-per-token class max (C < 16)."""
    cases = [_case(backend, 2, 8400, 80, 300, dtype) for dtype in (("fp32", "bf16", "fp16") if not quick else ("fp32", "bf16"))]
    cases += [_case(backend, 3, 500, 7, 300, "fp32", ties=True),
              _case(backend, 2, 300, 80, 300, "fp32"),  # k == T
              _case(backend, 1, 999, 3, 17, "fp32", nonfinite=True),
              _case(backend, 0, 100, 80, 10, "fp32"),
              _case(backend, 2, 300, 80, 300, "fp16", pairs=True)]
    if not quick:
        cases += [_case(backend, 1, 20000, 5, 300, "fp32", ties=True),
                  _case(backend, 1, 5000, 2, 4500, "fp32", nonfinite=True)]
    return cases
