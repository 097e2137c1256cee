"""The contract suite's description of ms_deform_attn (see op_testers/__init__.py)."""

from __future__ import annotations

import torch

import rtdetr_kernels
from msda_oracle import make_inputs, to_v1
from rtdetr_kernels.ms_deform_attn import op as msda_op

from . import BadInput, EmptyCase, OpcheckCase, OpTester, op_args

SHAPES = [(5, 7), (2, 3)]  # S = 41
N, LQ, M, D, L, P = 2, 3, 2, 3, 2, 2


def v2_layout(a, points=(2, 2)):
    """The valid v1 call in the flattened v2 layout with ``num_points_list``."""
    n, lq, m, l, p, _ = a["sampling_locations"].shape
    a["sampling_locations"] = a["sampling_locations"].reshape(n, lq, m, l * p, 2)
    a["attention_weights"] = a["attention_weights"].reshape(n, lq, m, l * p)
    a["num_points_list"] = list(points)
    return a


def _set(**changes):
    return lambda a: a.update(changes)


BAD_INPUTS = [
    # dtypes
    BadInput("value_int", lambda a: a.update(value=a["value"].long()), TypeError, "value"),
    BadInput("locations_int", lambda a: a.update(sampling_locations=a["sampling_locations"].int()), TypeError, "sampling_locations"),
    BadInput("weights_bool", lambda a: a.update(attention_weights=a["attention_weights"] > 0), TypeError, "attention_weights"),
    BadInput("value_not_tensor", lambda a: a.update(value=a["value"].tolist()), TypeError, "value"),
    # ranks
    BadInput("value_rank3", lambda a: a.update(value=a["value"].flatten(2)), ValueError, "value"),
    BadInput("value_rank5", lambda a: a.update(value=a["value"][None]), ValueError, "value"),
    BadInput("locations_rank4", lambda a: a.update(sampling_locations=a["sampling_locations"].flatten(2, 4)), ValueError, "sampling_locations"),
    BadInput("locations_rank7", lambda a: a.update(sampling_locations=a["sampling_locations"][None]), ValueError, "sampling_locations"),
    BadInput("weights_rank4", lambda a: a.update(attention_weights=a["attention_weights"].flatten(3)), ValueError, "attention_weights"),
    # mismatched sizes
    BadInput("locations_batch", lambda a: a.update(sampling_locations=a["sampling_locations"][:1]), ValueError, "sampling_locations"),
    BadInput("locations_heads", lambda a: a.update(sampling_locations=a["sampling_locations"][:, :, :1]), ValueError, "sampling_locations"),
    BadInput("locations_levels", lambda a: a.update(sampling_locations=a["sampling_locations"][:, :, :, :1]), ValueError, "sampling_locations"),
    BadInput("locations_xyz", lambda a: a.update(sampling_locations=torch.cat([a["sampling_locations"]] * 2, -1)[..., :3]), ValueError, "sampling_locations"),
    BadInput("weights_batch", lambda a: a.update(attention_weights=a["attention_weights"][:1]), ValueError, "attention_weights"),
    BadInput("weights_queries", lambda a: a.update(attention_weights=a["attention_weights"][:, :2]), ValueError, "attention_weights"),
    BadInput("weights_heads", lambda a: a.update(attention_weights=a["attention_weights"][:, :, :1]), ValueError, "attention_weights"),
    BadInput("weights_points", lambda a: a.update(attention_weights=a["attention_weights"][..., :1]), ValueError, "attention_weights"),
    BadInput("value_zero_heads", lambda a: a.update(value=a["value"][:, :, :0]), ValueError, "value"),
    # spatial shapes
    BadInput("shapes_sum_too_small", _set(spatial_shapes=[(5, 7), (2, 2)]), ValueError, "spatial_shapes"),
    BadInput("shapes_sum_too_large", _set(spatial_shapes=[(5, 7), (3, 3)]), ValueError, "spatial_shapes"),
    BadInput("shapes_swapped_levels_count", _set(spatial_shapes=[(5, 7), (2, 3), (0, 4)]), ValueError, "spatial_shapes"),
    BadInput("shapes_zero_height", _set(spatial_shapes=[(0, 7), (2, 3)]), ValueError, "spatial_shapes"),
    BadInput("shapes_negative_width", _set(spatial_shapes=[(5, -7), (2, 3)]), ValueError, "spatial_shapes"),
    BadInput("shapes_empty", _set(spatial_shapes=[]), ValueError, "spatial_shapes"),
    BadInput("shapes_triples", _set(spatial_shapes=[(5, 7, 1), (2, 3, 1)]), ValueError, "spatial_shapes"),
    BadInput("shapes_float_tensor", lambda a: a.update(spatial_shapes=torch.tensor(SHAPES, dtype=torch.float32)), TypeError, "spatial_shapes"),
    BadInput("shapes_tensor_1d", lambda a: a.update(spatial_shapes=torch.tensor([5, 7, 2, 3])), ValueError, "spatial_shapes"),
    BadInput("shapes_tensor_Lx3", lambda a: a.update(spatial_shapes=torch.tensor([[5, 7, 1], [2, 3, 1]])), ValueError, "spatial_shapes"),
    BadInput("shapes_float_sizes", _set(spatial_shapes=[(5.0, 7.0), (2.0, 3.0)]), TypeError, "spatial_shapes"),
    BadInput("shapes_not_sequence", _set(spatial_shapes=5), TypeError, "spatial_shapes"),
    # points per level
    BadInput("points_list_short", lambda a: v2_layout(a, (4,)), ValueError, "num_points_list"),
    BadInput("points_list_bad_sum", lambda a: v2_layout(a, (1, 2)), ValueError, "num_points_list"),
    BadInput("points_list_non_positive", lambda a: v2_layout(a, (4, 0)), ValueError, "num_points_list"),
    BadInput("points_v2_not_divisible", lambda a: (v2_layout(a), a.pop("num_points_list"), a.update(
        sampling_locations=a["sampling_locations"][:, :, :, :3], attention_weights=a["attention_weights"][..., :3])),
        ValueError, "num_points_list"),
    BadInput("points_v1_unequal_list", _set(num_points_list=[1, 3]), ValueError, "sampling_locations"),
    BadInput("points_v1_wrong_list", _set(num_points_list=[3, 3]), ValueError, "num_points_list"),
    # options
    BadInput("method_unknown", _set(method="nearest"), ValueError, "method"),
    BadInput("clamp_unknown", _set(method="discrete", discrete_clamp="both_h"), ValueError, "discrete_clamp"),
    BadInput("level_start_list", _set(level_start_index=[0, 36]), ValueError, "level_start_index"),
    BadInput("level_start_tensor", lambda a: a.update(level_start_index=torch.tensor([1, 35])), ValueError, "level_start_index"),
    BadInput("level_start_length", lambda a: a.update(level_start_index=torch.tensor([0])), ValueError, "level_start_index"),
    BadInput("backend_unknown", _set(backend="tpu"), ValueError, "backend"),
]


def _args(value, loc, weights, shapes=SHAPES, **options):
    return dict(value=value, spatial_shapes=shapes, sampling_locations=loc, attention_weights=weights, **options)


def _tensors(seed, n, lq, points, device, dtype=torch.float32):
    inputs = make_inputs(seed, n, lq, M, D, SHAPES, points, dtype=dtype)
    return inputs, [inputs[k].to(device=device, dtype=dtype) for k in ("value", "loc", "weights")]


class MsDeformAttnTester(OpTester):
    op = "ms_deform_attn"
    grad_names = ("value", "sampling_locations", "attention_weights")
    bad_inputs = BAD_INPUTS
    device_bound = ("sampling_locations", "attention_weights")
    tolerance = (2e-5, 1e-5)
    empty_cases = ("batch", "queries", "queries_discrete_locations_only")
    opcheck_cases = ("bilinear", "discrete")
    gradcheck_cases = ("v1-bilinear", "v1-discrete", "v2_132-bilinear", "v2_132-discrete")
    compile_sizes = (7, 13)  # denoising makes the query count vary per batch

    def function(self, **args):
        return rtdetr_kernels.ms_deform_attn(**args)

    def valid(self, device, seed=0):
        inputs = make_inputs(30 + seed, N, LQ, M, D, SHAPES, [P] * L, dtype=torch.float32)
        loc, weights = to_v1(inputs["loc"], inputs["weights"], L)
        return _args(inputs["value"].float().to(device), loc.float().to(device), weights.float().to(device))

    def describe(self, args):
        kwargs = {k: v for k, v in args.items() if k != "backend"}
        return msda_op.describe(msda_op.validate(**kwargs))

    def empty(self, case, device):
        n, lq = (0, 5) if case == "batch" else (2, 0)
        inputs = make_inputs(31, max(n, 1), max(lq, 1), M, D, SHAPES, [P] * L, dtype=torch.float32)
        loc, weights = to_v1(inputs["loc"][:n, :lq], inputs["weights"][:n, :lq], L)
        args = _args(inputs["value"][:n].float().to(device), loc.float().to(device), weights.float().to(device))
        if case == "queries_discrete_locations_only":
            return EmptyCase(dict(args, method="discrete"), [(n, lq, M * D)], grads=("sampling_locations",))
        return EmptyCase(args, [(n, lq, M * D)])

    def non_contiguous(self, device):
        args = self.valid(device)
        value, loc, weights = args["value"], args["sampling_locations"], args["attention_weights"]
        wide = torch.randn(N, 41, M, 2 * D, device=device)
        wide[..., ::2] = value
        loc_padded = torch.randn(*loc.shape[:-1], 3, device=device)
        loc_padded[..., :2] = loc
        variants = [
            _args(wide[..., ::2], loc_padded[..., :2], weights.transpose(1, 2).contiguous().transpose(1, 2)),
            _args(value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
                  loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5), weights),
        ]
        return args, variants

    def broadcast(self, device):
        args = self.valid(device)
        value, weights = args["value"][:1], args["attention_weights"][:1]
        expanded = dict(args, value=value.expand(N, *value.shape[1:]), attention_weights=weights.expand(N, *weights.shape[1:]))
        return dict(expanded, value=expanded["value"].contiguous(),
                    attention_weights=expanded["attention_weights"].contiguous()), expanded

    def opcheck(self, case, device, backend):
        method = msda_op.BILINEAR if case == "bilinear" else msda_op.DISCRETE_OFFICIAL
        inputs, (value, loc, weights) = _tensors(32, N, LQ, [1, 3], device)
        flat_shapes = [s for hw in SHAPES for s in hw]
        grad_out = inputs["grad_out"].to(device=device, dtype=torch.float32).reshape(N, LQ, M, D)
        common = dict(spatial_shapes=flat_shapes, points_per_level=[1, 3], method=method, backend=backend)
        forward = op_args(self.op, value=value.requires_grad_(), sampling_locations=loc.requires_grad_(),
                          attention_weights=weights.requires_grad_(), **common)
        backward = [op_args(f"{self.op}_backward", grad_output=grad_out, value=value.detach(),
                            sampling_locations=loc.detach(), attention_weights=weights.detach(), **common,
                            need_value=needs[0], need_locations=needs[1], need_weights=needs[2], deterministic=det)
                    for needs, det in (((True, True, True), False), ((True, False, False), False),
                                       ((False, True, True), False), ((True, True, True), True))]
        options = dict(method="discrete", discrete_clamp="official") if case == "discrete" else {}
        public = _args(value.detach(), loc.detach(), weights.detach(), num_points_list=[1, 3], **options)
        return OpcheckCase(forward, backward, public)

    def gradcheck(self, case, device):
        layout, method = case.split("-")
        shapes, points = ([(5, 7), (1, 1), (3, 2)], [2, 2, 2]) if layout == "v1" else ([(5, 7), (1, 1), (3, 2)], [1, 3, 2])
        # locations stay >= 1e-3 px from every knot and discrete rounding boundary, and gradcheck's
        # eps = 1e-6 moves a pixel coordinate by at most 7e-6 px, so every difference stays on one piece
        inputs = make_inputs(33, 1, 5, 2, 3, shapes, points)
        loc, weights = (to_v1(inputs["loc"], inputs["weights"], 3) if layout == "v1" else (inputs["loc"], inputs["weights"]))
        extra = {} if layout == "v1" else dict(num_points_list=points)
        return _args(inputs["value"].to(device), loc.to(device), weights.to(device), shapes, method=method, **extra)

    def compile_args(self, device, size):
        inputs = make_inputs(34 + size, N, size, M, D, SHAPES, [P] * L, dtype=torch.float32)
        loc, weights = to_v1(inputs["loc"], inputs["weights"], L)
        args = _args(inputs["value"].float().to(device), loc.float().to(device), weights.float().to(device))
        return args, [("sampling_locations", 1), ("attention_weights", 1)]

    def autocast_cast(self, args, low):
        # value follows the autocast dtype; locations and weights keep float32 precision
        return dict(args, value=args["value"].to(low))


TESTER = MsDeformAttnTester()
