"""Fused ops that make all-pairs distillation cheap.

Each op lives in its own file beside its plain PyTorch reference (the definition of the op),
a memory-lean chunked PyTorch path (what CPU users run) and a Triton kernel (GPU), in that
order, then one autograd.Function over both fused paths and one public function. Every op
takes ``impl="auto" | "triton" | "torch" | "reference"``; "auto" picks Triton for CUDA
tensors when Triton imports, else the lean torch path. The shared skeleton (Triton import,
impl choice, accumulation dtype, launch checks) is kernels/_common.py; measurement (peak
memory, time, box attention's cost model) is bench/kernels.py.
"""
from kernels._psi import psi_transform
from kernels.box_attention import box_attention, box_attention_reference, box_bias
from kernels.focal_loss import focal_loss, focal_loss_reference
from kernels.kl_distill import kl_distill, kl_distill_reference
from kernels.kl_distill_sigmoid import kl_distill_sigmoid, kl_distill_sigmoid_reference
from kernels.pair_enum import pair_enum, pair_enum_reference, spatial_features

__all__ = [
    "box_attention", "box_bias", "box_attention_reference",
    "pair_enum", "spatial_features", "pair_enum_reference",
    "kl_distill", "psi_transform", "kl_distill_reference",
    "kl_distill_sigmoid", "kl_distill_sigmoid_reference",
    "focal_loss", "focal_loss_reference",
]
