"""The contract suite's description of topk_select (see op_testers/__init__.py)."""

from __future__ import annotations

import math

import torch

import rtdetr_kernels
from rtdetr_kernels.topk import op as topk_op
from rtdetr_kernels.topk import topk_select_flat

from . import BadInput, EmptyCase, OpcheckCase, OpTester, op_args

N, T, C, HIDDEN, K = 2, 20, 4, 6, 5


def rtdetr_like(seed, n, tokens, classes, hidden, device="cpu", dtype=torch.float32, invalid=()):
    """(output_memory, logits, coord_unact) as RT-DETR's encoder output: inf box logits at the invalid
    anchors; distinct random scores."""
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(n, tokens, hidden, generator=gen, dtype=torch.float64).to(dtype)
    logits = torch.randn(n, tokens, classes, generator=gen, dtype=torch.float64).to(dtype)
    coords = torch.randn(n, tokens, 4, generator=gen, dtype=torch.float64).to(dtype)
    coords[:, list(invalid)] = math.inf
    return memory.to(device), logits.to(device), coords.to(device)


BAD_INPUTS = [
    BadInput("logits_int", lambda a: a.update(logits=a["logits"].long()), TypeError, "logits"),
    BadInput("logits_not_tensor", lambda a: a.update(logits=a["logits"].tolist()), TypeError, "logits"),
    BadInput("logits_rank2", lambda a: a.update(logits=a["logits"][..., 0]), ValueError, "logits"),
    BadInput("logits_rank4", lambda a: a.update(logits=a["logits"][None]), ValueError, "logits"),
    BadInput("logits_no_classes", lambda a: a.update(logits=a["logits"][..., :0]), ValueError, "logits"),
    BadInput("k_zero", lambda a: a.update(k=0), ValueError, "k"),
    BadInput("k_negative", lambda a: a.update(k=-1), ValueError, "k"),
    BadInput("k_above_tokens", lambda a: a.update(k=21), ValueError, r"^k: (?=.*\b21\b)(?=.*T\b.*= 20\b)"),  # names k, its value and T
    BadInput("k_float", lambda a: a.update(k=5.0), TypeError, "k"),
    BadInput("k_bool", lambda a: a.update(k=True), TypeError, "k"),
    BadInput("k_tensor", lambda a: a.update(k=torch.tensor(5)), TypeError, "k"),
    BadInput("gather_single_tensor", lambda a: a.update(gather=a["gather"][0]), TypeError, "gather"),
    BadInput("gather_not_sequence", lambda a: a.update(gather=5), TypeError, "gather"),
    BadInput("gather_entry_not_tensor", lambda a: a.update(gather=(a["gather"][0], [1, 2])), TypeError, r"gather\[1\]"),
    BadInput("gather_batch", lambda a: a.update(gather=(a["gather"][0][:1],)), ValueError, r"gather\[0\]"),
    BadInput("gather_tokens", lambda a: a.update(gather=(a["gather"][0], a["gather"][1][:, :19])), ValueError, r"gather\[1\]"),
    BadInput("gather_rank1", lambda a: a.update(gather=(torch.randn(2),)), ValueError, r"gather\[0\]"),
    BadInput("backend_unknown", lambda a: a.update(backend="tpu"), ValueError, "backend"),
]


class TopkSelectTester(OpTester):
    """Arguments with ``logits`` are a topk_select call (rank each token's class max); with ``scores``
    a topk_select_flat call (the post-processor's form: rank every (query, class) pair, pairs=True)."""

    op = "topk_select"
    grad_names = ("logits", "scores", "gather")
    bad_inputs = BAD_INPUTS
    device_bound = ("gather[0]",)
    tolerance = (0.0, 0.0)  # selection and copies: exact
    empty_cases = ("batch", "batch_pairs")
    opcheck_cases = ("gather", "strided", "pairs")
    gradcheck_cases = ("memory_and_logits", "pairs")
    compile_sizes = (20, 33)  # the token count varies with the input size

    def function(self, **args):
        if "scores" in args:
            return topk_select_flat(**args)
        return rtdetr_kernels.topk_select(**args)

    def outputs(self, result):
        *selected, gathered = result  # (scores, indices) or (scores, labels, queries)
        return (*selected, *gathered)

    def valid(self, device, seed=0):
        memory, logits, coords = rtdetr_like(60 + seed, N, T, C, HIDDEN, device)
        return dict(logits=logits, k=K, gather=(memory, coords))

    def describe(self, args):
        pairs = "scores" in args
        problem = topk_op.validate(args["scores" if pairs else "logits"], args["k"], args.get("gather", ()), pairs=pairs)
        return topk_op.describe(problem)

    def empty(self, case, device):
        memory, logits, _ = rtdetr_like(61, 0, 9, 4, 5, device)
        if case == "batch_pairs":
            return EmptyCase(dict(scores=logits, k=11, gather=(memory,)), [(0, 11), (0, 11), (0, 11), (0, 11, 5)])
        return EmptyCase(dict(logits=logits, k=3, gather=(memory,)), [(0, 3), (0, 3), (0, 3, 5)])

    def non_contiguous(self, device):
        args = self.valid(device)
        memory, coords = args["gather"]
        wide = torch.randn(N, T, 2 * HIDDEN, device=device)
        wide[..., ::2] = memory
        logits_t = args["logits"].transpose(0, 1).contiguous().transpose(0, 1)
        return args, [dict(args, logits=logits_t, gather=(wide[..., ::2], coords.transpose(1, 2).contiguous().transpose(1, 2))),
                      dict(args, gather=(memory.transpose(0, 1).contiguous().transpose(0, 1), coords))]

    def broadcast(self, device):
        args = self.valid(device)
        memory, coords = args["gather"]
        expanded = dict(args, gather=(memory[..., :1].expand(N, T, HIDDEN), coords[:1].expand(N, T, 4)))
        return dict(args, gather=tuple(t.contiguous() for t in expanded["gather"])), expanded

    def opcheck(self, case, device, backend):
        memory, logits, coords = rtdetr_like(62, 2, 20, 4, 6, device, invalid=[3])
        pairs, k = case == "pairs", 7
        if case == "gather":
            labels = torch.randint(0, 4, (2, 20), generator=torch.Generator().manual_seed(62)).to(device)
            sources, differentiable = [memory, coords, labels], [memory, coords]
        elif case == "strided":
            logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
            sources = differentiable = [memory[..., ::2]]
        else:  # more pairs than tokens, so that one token can be chosen with several classes
            sources, differentiable, k = [coords], [coords], 30
        forward = op_args(self.op, logits=logits.requires_grad_(), k=k, pairs=pairs, backend=backend,
                          gather=[t.requires_grad_() if t.is_floating_point() else t for t in sources])
        _, indices, classes, gathered = torch.ops.rtdetr_kernels.topk_select.default(
            *op_args(self.op, logits=logits.detach(), k=k, gather=[t.detach() for t in differentiable], pairs=pairs,
                     backend=backend))
        grad_scores = torch.randn(2, k, device=device)
        grads = [torch.randn_like(g) for g in gathered]
        needs = [(True, [True] * len(grads), False), (False, [True] + [False] * (len(grads) - 1), False),
                 (True, [False] * len(grads), False), (True, [True] * len(grads), True)]
        backward = [op_args(f"{self.op}_backward", grad_scores=grad_scores, indices=indices, classes=classes,
                            grad_gathered=grads, num_tokens=20, num_classes=4, pairs=pairs, need_logits=need_logits,
                            need_gather=need_gather, deterministic=det, backend=backend)
                    for need_logits, need_gather, det in needs]
        public = dict(scores=logits.detach()) if pairs else dict(logits=logits.detach())
        return OpcheckCase(forward, backward, dict(public, k=k, gather=[t.detach() for t in sources]))

    def gradcheck(self, case, device):
        # distinct class maxima with gaps of 1 >> eps: the order is stable under gradcheck's nudges
        gen = torch.Generator().manual_seed(63)
        token_scores = torch.randperm(12, generator=gen).double().reshape(1, 12).repeat(2, 1)
        logits = token_scores.unsqueeze(-1) - 1 - torch.rand(2, 12, 3, generator=gen, dtype=torch.float64)
        logits.scatter_(2, torch.randint(0, 3, (2, 12, 1), generator=gen), token_scores.unsqueeze(-1))
        memory = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
        if case == "pairs":  # all 36 pair scores distinct, gaps >= 0.03 >> eps
            scores = (torch.randperm(36, generator=gen).double() / 30).reshape(1, 12, 3).repeat(2, 1, 1)
            return dict(scores=scores.to(device), k=20, gather=(memory.to(device),))
        return dict(logits=logits.to(device), k=5, gather=(memory.to(device), logits.to(device)))

    def compile_args(self, device, size):
        memory, logits, coords = rtdetr_like(64 + size, 2, size, 4, 6, device, invalid=[0])
        return dict(logits=logits, k=5, gather=(memory, coords)), [("logits", 1), ("gather[0]", 1), ("gather[1]", 1)]


TESTER = TopkSelectTester()
