from .op import aifi_attention, explain
from .reference import aifi_attention_reference

__all__ = ["aifi_attention", "explain", "aifi_attention_reference"]
