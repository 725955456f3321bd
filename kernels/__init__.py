"""Fused ops that make all-pairs distillation cheap.

Each op lives in its own file beside its plain PyTorch reference (the definition of the op),
a memory-lean chunked PyTorch path (what CPU users run) and a Triton kernel (GPU). Every op
takes ``impl="auto" | "triton" | "torch" | "reference"``; "auto" picks Triton for CUDA
tensors when Triton imports, else the lean torch path.
"""
from kernels.box_attention import box_attention, box_bias, box_attention_reference
from kernels.pair_enum import pair_enum, spatial_features, pair_enum_reference
from kernels.kl_distill import kl_distill, psi_transform, kl_distill_reference

__all__ = [
    "box_attention", "box_bias", "box_attention_reference",
    "pair_enum", "spatial_features", "pair_enum_reference",
    "kl_distill", "psi_transform", "kl_distill_reference",
]
