"""Helpers shared by the kernel wrappers: implementation choice and Triton availability."""
import os

import torch

IMPLS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    """True when Triton can run: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Map impl="auto" to a concrete path: Triton for CUDA tensors, else the lean torch path."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    return "triton" if on_cuda and triton_available() else "torch"
