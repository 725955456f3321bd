"""Measurement code the benchmarks share (bench/kernels.py, bench/train_step.py, bench/gpu_check.py).

Peak memory a callable adds, measured in a process of its own (run_child, child_envs):
- CPU (cpu_peak_mb): writing "5" to /proc/self/clear_refs resets the kernel's high-water mark
  VmHWM to the current RSS; after run() (its outputs and gradients left allocated) the peak is
  VmHWM - RSS_before. So that RSS follows the live tensors, the memory process runs with glibc's
  MALLOC_MMAP_THRESHOLD_=65536 (every block of 64 KiB or more is its own mapping, returned to
  the OS when freed; a fixed threshold also turns off glibc's adaptive threshold) and calls
  malloc_trim(0) before the baseline. If clear_refs cannot be written, a thread samples VmRSS
  every 0.5 ms instead (can miss spikes; method "rss-sampling").
- CPU, exact and slow (profiler_peak_mb): the peak of live tensor bytes from torch.profiler's
  memory events (what the memory test of tests/test_box_attention.py uses).
- CUDA (cuda_peak_mb): torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
  minus memory_allocated() before.
"""
import ctypes
import gc
import json
import os
import subprocess
import threading
import time

MIB = 1 << 20


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def cpu_peak_mb(run):
    """Peak RSS added by run() (MiB): VmHWM reset through clear_refs, else RSS sampling."""
    _trim()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "vmhwm"
    except OSError:
        method = "rss-sampling"
    if method == "vmhwm":
        run()
        peak = _status_kb("VmHWM")
    else:
        peak, done = base, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _status_kb("VmRSS"))
                time.sleep(0.0005)
        th = threading.Thread(target=sample)
        th.start()
        try:
            run()
        finally:
            done.set()
            th.join()
        peak = max(peak, _status_kb("VmRSS"))
    return (peak - base) / 1024, method


def cuda_peak_mb(run):
    """Peak CUDA memory added by run() (MiB): max_memory_allocated() after
    reset_peak_memory_stats(), minus memory_allocated() before (synchronised on both sides)."""
    import torch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def profiler_peak_mb(run):
    """Peak of live CPU tensor bytes allocated during run() (MiB), from torch.profiler memory
    events: exact at the allocator level (no heap caching, no other threads), but slow."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:  # nbytes > 0: allocation, < 0: free
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / MIB


# ----------------------------------------------------------------------------- one process per measurement

def run_child(cmd, env, timeout, cwd=None):
    """Run one measurement process (cmd) -> the last JSON line it printed, or {"error": ...}
    naming the timeout or the exit code and the last line of its stderr."""
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {res.returncode}: {tail}"}
    return json.loads(lines[-1])


def child_envs():
    """(time env, memory env) of the measurement processes: both without TRITON_INTERPRET; the
    memory one with glibc's fixed mmap threshold, so that RSS follows the live tensors (see above)."""
    env_time = dict(os.environ)
    env_time.pop("TRITON_INTERPRET", None)
    return env_time, dict(env_time, MALLOC_MMAP_THRESHOLD_="65536")
