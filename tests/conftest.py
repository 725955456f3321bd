"""Test configuration shared by every test file.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, i.e. before
kernels/ is imported, so it is set here, at the top of the first file pytest imports.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
