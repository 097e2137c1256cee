"""Pure-PyTorch reference implementation of RT-DETR (lyuwenyu/RT-DETR v1, plus RT-DETRv2 decoder options)."""
from . import convert, criterion, denoising, ops, testing
from .backbone import FrozenBatchNorm2d, PResNet
from .criterion import HungarianMatcher, SetCriterion, build_criterion
from .decoder import MSDeformableAttention, RTDETRTransformer
from .encoder import HybridEncoder, build_2d_sincos_position_embedding
from .model import (CONFIGS, MSCOCO_CATEGORY_IDS, RTDETR, RTDETRPostProcessor, build_model, extract_state_dict,
                    load_checkpoint)
from .ops import deformable_attention_core_func, deformable_attention_core_func_v2

__all__ = ["convert", "criterion", "denoising", "ops", "testing", "HungarianMatcher", "SetCriterion",
           "build_criterion", "FrozenBatchNorm2d", "PResNet", "HybridEncoder", "RTDETRTransformer", "MSDeformableAttention",
           "RTDETR", "RTDETRPostProcessor", "CONFIGS", "MSCOCO_CATEGORY_IDS", "build_model", "load_checkpoint",
           "extract_state_dict", "build_2d_sincos_position_embedding", "deformable_attention_core_func",
           "deformable_attention_core_func_v2"]
