"""The contract suite's description of aifi_attention (see op_testers/__init__.py)."""

from __future__ import annotations

import torch

import rtdetr_kernels
from rtdetr_kernels.attention import op as attention_op

from . import BadInput, EmptyCase, OpcheckCase, OpTester, op_args

E, H, N, L = 8, 2, 2, 5
TENSORS = ("x", "pos", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")


def _args(seed, n, length, e, heads, dtype=torch.float32, device="cpu", pos_batch=1, mask=None):
    """x [n, length, e], pos, and nn.MultiheadAttention-shaped parameters with non-zero biases (as after
    training)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return dict(x=randn(n, length, e), pos=None if pos_batch is None else randn(pos_batch, length, e),
                in_proj_weight=randn(3 * e, e, scale=e ** -0.5), in_proj_bias=randn(3 * e, scale=0.5),
                out_proj_weight=randn(e, e, scale=e ** -0.5), out_proj_bias=randn(e, scale=0.5),
                num_heads=heads, attn_mask=mask)


def random_mask(kind, n, heads, length, per_head, seed=0, device="cpu"):
    """A bool (True = blocked) or additive float mask with a query row that may see nothing."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n * heads, length, length) if per_head else (length, length)
    blocked = torch.rand(shape, generator=gen) < 0.4
    blocked[..., 0, :] = False
    blocked[..., -1, :] = True
    if kind == "bool":
        return blocked.to(device)
    additive = torch.randn(shape, generator=gen, dtype=torch.float64)
    return additive.masked_fill(blocked, float("-inf")).to(device)


BAD_INPUTS = [
    BadInput("x_int", lambda a: a.update(x=a["x"].long()), TypeError, "x"),
    BadInput("x_not_tensor", lambda a: a.update(x=a["x"].tolist()), TypeError, "x"),
    BadInput("x_rank2", lambda a: a.update(x=a["x"][0]), ValueError, "x"),
    BadInput("x_rank4", lambda a: a.update(x=a["x"][None]), ValueError, "x"),
    BadInput("heads_not_dividing", lambda a: a.update(num_heads=3), ValueError, "num_heads"),
    BadInput("heads_zero", lambda a: a.update(num_heads=0), ValueError, "num_heads"),
    BadInput("heads_float", lambda a: a.update(num_heads=2.0), TypeError, "num_heads"),
    BadInput("x_zero_width", lambda a: a.update(x=a["x"][..., :0]), ValueError, "num_heads"),
    BadInput("in_w_shape", lambda a: a.update(in_proj_weight=a["in_proj_weight"][:16]), ValueError, "in_proj_weight"),
    BadInput("in_w_transposed", lambda a: a.update(in_proj_weight=a["in_proj_weight"].t()), ValueError, "in_proj_weight"),
    BadInput("in_b_shape", lambda a: a.update(in_proj_bias=a["in_proj_bias"][:8]), ValueError, "in_proj_bias"),
    BadInput("out_w_shape", lambda a: a.update(out_proj_weight=a["out_proj_weight"][:, :4]), ValueError, "out_proj_weight"),
    BadInput("out_b_shape", lambda a: a.update(out_proj_bias=a["out_proj_bias"][None]), ValueError, "out_proj_bias"),
    BadInput("in_w_missing", lambda a: a.update(in_proj_weight=None), TypeError, "in_proj_weight"),
    BadInput("out_w_dtype", lambda a: a.update(out_proj_weight=a["out_proj_weight"].double()), TypeError, "out_proj_weight"),
    BadInput("in_b_dtype", lambda a: a.update(in_proj_bias=a["in_proj_bias"].half()), TypeError, "in_proj_bias"),
    BadInput("pos_dtype", lambda a: a.update(pos=a["pos"].double()), TypeError, "pos"),
    BadInput("pos_length", lambda a: a.update(pos=a["pos"][:, :4]), ValueError, "pos"),
    BadInput("pos_batch", lambda a: a.update(pos=a["pos"].expand(3, 5, 8)), ValueError, "pos"),
    BadInput("pos_rank4", lambda a: a.update(pos=a["pos"][None]), ValueError, "pos"),
    BadInput("mask_int", lambda a: a.update(attn_mask=torch.zeros(5, 5, dtype=torch.int64)), TypeError, "attn_mask"),
    BadInput("mask_shape", lambda a: a.update(attn_mask=torch.zeros(5, 4, dtype=torch.bool)), ValueError, "attn_mask"),
    BadInput("mask_batch_not_heads", lambda a: a.update(attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), ValueError, "attn_mask"),
    BadInput("mask_not_tensor", lambda a: a.update(attn_mask=[[True]]), TypeError, "attn_mask"),
    BadInput("mask_other_device", lambda a: a.update(attn_mask=torch.zeros(5, 5, dtype=torch.bool, device="meta")), ValueError, "attn_mask"),
    BadInput("backend_unknown", lambda a: a.update(backend="tpu"), ValueError, "backend"),
]


class AifiAttentionTester(OpTester):
    op = "aifi_attention"
    grad_names = TENSORS  # no gradient flows to a floating mask
    bad_inputs = BAD_INPUTS
    device_bound = ("pos", "in_proj_weight", "out_proj_bias")
    tolerance = (1e-5, 1e-4)  # BLAS may sum in another order for other strides
    empty_cases = ("batch",)
    opcheck_cases = ("full", "strided", "bool_mask", "float_mask_no_pos_no_bias")
    gradcheck_cases = ("no_mask", "bool_mask", "float_mask")
    compile_sizes = (6, 9)  # the decoder's query count varies with denoising

    def function(self, **args):
        return rtdetr_kernels.aifi_attention(**args)

    def valid(self, device, seed=0):
        return _args(50 + seed, N, L, E, H, device=device)

    def describe(self, args):
        kwargs = {k: v for k, v in args.items() if k != "backend"}
        return attention_op.describe(attention_op.validate(**kwargs))

    def empty(self, case, device):
        return EmptyCase(_args(51, 0, 7, E, H, device=device), [(0, 7, E)])

    def non_contiguous(self, device):
        args = self.valid(device)
        restrided = dict(args, x=args["x"].transpose(0, 1).contiguous().transpose(0, 1),
                         in_proj_weight=args["in_proj_weight"].t().contiguous().t(),
                         out_proj_weight=args["out_proj_weight"].t().contiguous().t())
        sliced_pos = torch.randn(1, L, 2 * E, device=device)[..., ::2]
        sliced_pos.copy_(args["pos"])
        return args, [restrided, dict(args, pos=sliced_pos)]

    def broadcast(self, device):
        args = self.valid(device)
        expanded = dict(args, pos=args["pos"].expand(N, L, E), out_proj_bias=args["out_proj_bias"][:1].expand(E))
        return dict(expanded, pos=expanded["pos"].contiguous(), out_proj_bias=expanded["out_proj_bias"].contiguous()), expanded

    def opcheck(self, case, device, backend):
        args = _args(52, N, L, E, H, device=device, pos_batch=None if case.endswith("no_pos_no_bias") else 1)
        if case == "strided":
            args = dict(args, x=args["x"].transpose(0, 1).contiguous().transpose(0, 1),
                        in_proj_weight=args["in_proj_weight"].t().contiguous().t())
        elif case == "bool_mask":
            args["attn_mask"] = random_mask("bool", N, H, L, per_head=False, device=device)
        elif case == "float_mask_no_pos_no_bias":
            args.update(in_proj_bias=None, out_proj_bias=None,
                        attn_mask=random_mask("float", N, H, L, per_head=True, device=device).float())
        plain = {k: args[k] for k in TENSORS + ("num_heads", "attn_mask")}
        with_grad = {k: t.detach().requires_grad_() if k in TENSORS and t is not None else t for k, t in plain.items()}
        forward = op_args(self.op, **with_grad, backend=backend)
        grad_out = torch.randn_like(args["x"])
        backward = [op_args(f"{self.op}_backward", grad_output=grad_out, **plain, needs=needs, deterministic=det,
                            backend=backend)
                    for needs, det in (([True] * 6, False), ([True, False, False, False, False, False], False),
                                       ([False, True, True, True, False, True], False), ([True] * 6, True))]
        return OpcheckCase(forward, backward, args)

    def gradcheck(self, case, device):
        kind = None if case == "no_mask" else case.split("_")[0]
        mask = None if kind is None else random_mask(kind, 2, 2, 3, per_head=kind == "float", device=device)
        return _args(53, 2, 3, 4, 2, dtype=torch.float64, device=device, mask=mask)

    def compile_args(self, device, size):
        args = _args(54 + size, 2, size, 16, 2, device=device)
        args["attn_mask"] = (torch.rand(size, size, generator=torch.Generator().manual_seed(size)) < 0.3).to(device)
        return args, [("x", 1), ("pos", 1), ("attn_mask", 0), ("attn_mask", 1)]

    def autocast_args(self, device, low):
        args = self.valid(device)
        return dict(args, x=args["x"].to(low))  # AMP's mixed dtypes are accepted

    def autocast_cast(self, args, low):
        # as nn.MultiheadAttention's linears under autocast: every floating input follows the autocast
        # dtype (a float mask keeps its precision)
        return dict(args, **{k: args[k].to(low) for k in TENSORS if args[k] is not None})


TESTER = AifiAttentionTester()
