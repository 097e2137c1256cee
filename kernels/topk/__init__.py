from .op import explain, topk_select, topk_select_flat
from .reference import topk_select_reference

__all__ = ["topk_select", "topk_select_flat", "explain", "topk_select_reference"]
