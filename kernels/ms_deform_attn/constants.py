"""MSDA facts shared by the op, its reference and its kernels (the C++/CUDA side mirrors them in
csrc/ms_deform_attn/ms_deform_attn.h)."""

MAX_LEVELS = 16  # the compiled kernels take the level metadata by value, 16 slots

# method codes passed to every backend's kernels
BILINEAR, DISCRETE_PER_AXIS, DISCRETE_OFFICIAL = 0, 1, 2
METHOD_NAMES = {BILINEAR: ("bilinear", "per_axis"), DISCRETE_PER_AXIS: ("discrete", "per_axis"),
                DISCRETE_OFFICIAL: ("discrete", "official")}  # code -> (method, discrete_clamp)
