"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, i.e. before
kernels/ is imported, so it is set here, at the top of the first file pytest imports.
"""
import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels._common import triton_available  # noqa: E402  (after TRITON_INTERPRET is set)

#: the fused impls every kernel test runs (Triton in the interpreter on a CPU)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
#: tiles of the [pairs, classes] ops small enough that several programs and class blocks run
BLOCKS = {"torch": {}, "triton": {"blocks": (4, 16)}}


def logit_case(N, C, M, with_prior, seed=0, scale=3.0, dtype=None):
    """A [pairs, classes] test case of the KL / focal ops: student logits [N, C], teacher
    logits [N, C] (M=None) or [M, N, C], and (with_prior) a prior [N, C] with zeros, a column of
    ones, a fully masked row (2) and a row with a single allowed class (3); logits in dtype."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, C, generator=g) * scale
    t = torch.randn(*(() if M is None else (M,)), N, C, generator=g) * scale
    prior = None
    if with_prior:
        prior = torch.rand(N, C, generator=g)
        prior[prior < 0.3] = 0.0
        prior[:, 1] = 1.0
        prior[2] = 0.0
        prior[3] = 0.0
        prior[3, C - 1] = 0.7
    if dtype is not None:
        s, t = s.to(dtype), t.to(dtype)
    return s, t, prior


def aot_compile_in_subprocess(code: str) -> str:
    """Run `code` in a fresh process without TRITON_INTERPRET, so the kernels are real JIT
    functions that it compiles for an H100 (sm_90) down to cubin with no GPU present.
    Returns its stdout; skips when this triton install has no ptxas."""
    import subprocess

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture
def no_hang():
    """A test that blocks (a read of a FIFO or /dev/zero that never ends) fails after 60 s instead
    of hanging the suite."""
    def on_alarm(*_):
        raise TimeoutError("blocked on a special file")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
