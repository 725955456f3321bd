"""The skeleton every op in kernels/ shares: the optional Triton import, the implementation
choice, the accumulation dtype, and the checks a Triton launch needs.

Every op file reads top to bottom the same way: the reference (the definition) -> the lean
chunked torch path -> the Triton kernels and their launchers -> one autograd.Function that
calls either fused path -> one public function with the ``impl`` switch.

The Triton CPU interpreter (TRITON_INTERPRET=1, used by the tests) checks none of the limits a
real GPU launch has (block sizes, contiguity, dtypes, out-of-bounds indices), so the wrappers
check them here, before every launch, with the same rules on both.
"""
import contextlib
import functools
import os

import torch

try:  # Triton is optional: without it only the torch paths run
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

IMPLS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_ELEMS = 16384        # elements in one program's 2-D tile (registers on a GPU)
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "int64",
          torch.int32: "int32"}


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The one accumulation rule of every fused path: fp32 whatever the input dtypes (fp16 /
    bf16 / fp32), fp64 when any input is fp64 (so that gradcheck can run on the torch paths)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def autocast_off(method):
    """Run an autograd.Function's forward or backward with autocast off.

    Each op chooses its own dtypes (acc_dtype; the Triton kernels accumulate in fp32). Under an
    ambient autocast the lean torch paths' matmuls would be recast to bf16 / fp16 behind their
    back and break their in-place fp32 accumulations (baddbmm_ into an fp32 bias raises
    "Input dtypes must be the same"; seen in a bf16 training step on an H200).
    """
    @functools.wraps(method)
    def wrapper(ctx, *args):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return method(ctx, *args)
    return wrapper


def triton_available() -> bool:
    """True when Triton can run: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Map impl="auto" to a concrete path: Triton for CUDA tensors, else the lean torch path.

    An explicit impl="triton" needs CUDA tensors, or CPU tensors under the interpreter.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' but triton cannot run here (no CUDA device, TRITON_INTERPRET unset)")
        if any(not t.is_cuda for t in tensors) and not interpreting():
            raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return impl
    if impl != "auto":
        return impl
    on_cuda = all(t.is_cuda for t in tensors)
    return "triton" if on_cuda and triton_available() else "torch"


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_blocks(op: str, *blocks: int) -> None:
    """Block sizes must be powers of two (tl.arange) and the tile must fit in registers."""
    prod = 1
    for bsz in blocks:
        if not is_pow2(int(bsz)):
            raise ValueError(f"{op}: block sizes must be powers of two, got {blocks}")
        prod *= int(bsz)
    if prod > MAX_BLOCK_ELEMS:
        raise ValueError(f"{op}: tile of {prod} elements exceeds {MAX_BLOCK_ELEMS}")


def check_launch(op: str, *tensors: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    """Tensors handed to a Triton kernel: contiguous, one device, supported dtypes."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on several devices {sorted(map(str, devices))}")
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"{op}: Triton kernel needs contiguous tensors, got strides {t.stride()}")
        if t.dtype not in dtypes:
            names = "/".join(_SHORT.get(d, str(d)) for d in dtypes)
            raise ValueError(f"{op}: dtype {t.dtype} not supported by the Triton kernel ({names})")


def triton_constant(t: torch.Tensor) -> torch.Tensor:
    """A constant input (no gradient: a prior, labels) as a Triton kernel reads it: contiguous,
    in its own dtype when fp32 / fp16 / bf16, else (fp64, integer, bool) as fp32."""
    return (t if t.dtype in FLOAT_DTYPES else t.float()).contiguous()


def check_index(op: str, name: str, idx: torch.Tensor, n: int) -> None:
    """Index tensors must be 1-D integer tensors with values in [0, n): neither a GPU launch nor
    the interpreter detects an out-of-bounds gather, so it is checked here (one device sync)."""
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: {name} must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{op}: {name} has values outside [0, {n})")


def chunk_rows(n_cols: int, target_elems: int = 1 << 19) -> int:
    """Rows per chunk so that one fp32 chunk temporary holds about target_elems elements."""
    return max(1, target_elems // max(1, n_cols))


def aot_compile(fn, signature: dict, constexprs: dict, arch: int = 90):
    """Compile a @triton.jit kernel for an NVIDIA GPU of compute capability `arch` (90 = H100)
    down to a cubin, with no GPU present. It catches what the CPU interpreter lets through
    (frontend and type errors, layouts, register-size limits). Needs a process where
    TRITON_INTERPRET is unset (the kernels must be real JITFunctions); the tests run it in a
    subprocess. signature: {arg: "*fp32" | "i32" | "fp32" | "constexpr" ...}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))
