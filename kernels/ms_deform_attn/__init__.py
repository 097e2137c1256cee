from .op import ms_deform_attn, explain
from .reference import ms_deform_attn_grid_sample, ms_deform_attn_reference

__all__ = ["ms_deform_attn", "explain", "ms_deform_attn_reference", "ms_deform_attn_grid_sample"]
