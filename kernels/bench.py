"""Benchmark of the fused ops: peak extra memory and time of forward + backward.

    python -m kernels.bench                      # every op, every impl this machine runs
    python -m kernels.bench --ops kl_distill     # a subset (comma-separated)
    python -m kernels.bench --threads 1          # one torch thread (a CPU shared with other jobs)
    python -m kernels.bench --one kl_distill torch --measure memory   # one measurement (internal)

Prints one JSON object per line:
    {"op": ..., "impl": "reference" | "torch" | "triton", "shape": {...}, "peak_mb": ..., "ms": ...,
     "device": ...}
CPU runs "reference" and "torch"; a CUDA machine also "triton" ("auto" is one of these).

Shapes (fp32, seeded random inputs):
- box_attention: P = 4,096 pairs over B = 4 images (1,024 each), Hd = 8 heads,
  T = 37 x 37 = 1,369 tokens, D = 32; gradients to q, k, v, strength.
- pair_enum: N = 128 boxes of one image, the first 64 humans; every human paired with every
  other box, P = 64 x 127 = 8,128 pairs; D = Do = 256; gradients to q, w1, w2, b.
- kl_distill: N = 32,768 rows x C = 600 classes, T = 2, a detection prior (uniform in (0, 1],
  half of the entries 0 = masked), M = 1 teacher and M = 2 teachers; gradient to the student.

Method. Every measurement runs in a fresh process (`--one OP IMPL --measure memory|time`), so
one op's memory never pollutes another's. The process builds the inputs, runs forward +
backward once as warm-up, drops the gradients, then:
- peak_mb, on CPU: the peak resident set size the op adds. Writing "5" to /proc/self/clear_refs
  resets the kernel's high-water mark VmHWM to the current RSS; after one forward + backward
  (gradients included, left allocated) peak_mb = VmHWM - RSS_before. So that RSS follows the
  live tensors, the memory process runs with glibc's MALLOC_MMAP_THRESHOLD_=65536 (every block
  of 64 KiB or more is its own mapping, returned to the OS when freed; a fixed threshold also
  turns off glibc's adaptive threshold) and calls malloc_trim(0) before the baseline. If
  clear_refs cannot be written, a thread samples VmRSS every 0.5 ms instead (can miss spikes;
  the line then says "mem_method": "rss-sampling").
- peak_mb, on CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
  memory_allocated() before.
- ms: on CPU the median of --repeat wall-clock forward + backward runs (torch's default thread
  count unless --threads; on a CPU shared with other jobs, several threads per op mostly
  measure how long the op waits at its barrier for a descheduled thread) in a second process with
  the default allocator (the mmap threshold above would add page-fault time); on CUDA
  triton.testing.do_bench (median).
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

OPS = ("box_attention", "pair_enum", "kl_distill")
MIB = 1 << 20


# ----------------------------------------------------------------------------- inputs

def _boxes(n, g, torch):
    """n random normalised xyxy boxes [n, 4]."""
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = 0.02 + torch.rand(n, 2, generator=g) * 0.28
    return torch.cat([xy, xy + wh], 1)


def make_case(op, device, teachers=1):
    """-> (shape dict, step(): forward + backward, list of leaf tensors that get gradients)."""
    import torch
    import kernels

    g = torch.Generator().manual_seed(0)
    if op == "box_attention":
        P, B, Hd, gh, gw, D = 4096, 4, 8, 37, 37, 32
        T = gh * gw
        q = torch.randn(P, Hd, D, generator=g)
        k = torch.randn(B, Hd, T, D, generator=g)
        v = torch.randn(B, Hd, T, D, generator=g)
        strength = torch.randn(Hd, 3, generator=g)
        pair_image = torch.arange(B).repeat_interleave(P // B)
        bh, bo = _boxes(P, g, torch), _boxes(P, g, torch)
        union = torch.cat([torch.minimum(bh[:, :2], bo[:, :2]), torch.maximum(bh[:, 2:], bo[:, 2:])], 1)
        boxes = torch.stack([bh, bo, union], 1)                                   # [P, 3, 4]
        upstream = torch.randn(P, Hd, D, generator=g)
        leaves = [t.to(device).requires_grad_() for t in (q, k, v, strength)]
        pair_image, boxes, upstream = pair_image.to(device), boxes.to(device), upstream.to(device)
        shape = {"P": P, "B": B, "Hd": Hd, "T": T, "grid": [gh, gw], "D": D, "dtype": "float32"}

        def fwd(impl):
            return kernels.box_attention(leaves[0], leaves[1], leaves[2], pair_image, boxes,
                                         leaves[3], (gh, gw), impl=impl)
    elif op == "pair_enum":
        N, H, D, Do = 128, 64, 256, 256
        q = torch.randn(N, D, generator=g)
        w1 = torch.randn(Do, D, generator=g) / D ** 0.5
        w2 = torch.randn(Do, D, generator=g) / D ** 0.5
        b = torch.randn(Do, generator=g)
        boxes = _boxes(N, g, torch).to(device)
        hh, oo = torch.meshgrid(torch.arange(H), torch.arange(N), indexing="ij")
        keep = hh != oo
        idx_h, idx_o = hh[keep].to(device), oo[keep].to(device)                 # P = 64 x 127
        upstream = torch.randn(idx_h.shape[0], Do, generator=g).to(device)
        leaves = [t.to(device).requires_grad_() for t in (q, w1, w2, b)]
        shape = {"N": N, "humans": H, "P": int(idx_h.shape[0]), "D": D, "Do": Do, "dtype": "float32"}

        def fwd(impl):
            return kernels.pair_enum(leaves[0], boxes, idx_h, idx_o, leaves[1], leaves[2], leaves[3],
                                     impl=impl)[0]
    elif op == "kl_distill":
        N, C, M = 32768, 600, teachers
        s = torch.randn(N, C, generator=g) * 3
        t = torch.randn(M, N, C, generator=g) * 3
        t = t[0] if M == 1 else t
        prior = 1.0 - torch.rand(N, C, generator=g)                             # (0, 1]
        prior[torch.rand(N, C, generator=g) < 0.5] = 0.0
        t, prior = t.to(device), prior.to(device)
        leaves = [s.to(device).requires_grad_()]
        upstream = None
        shape = {"N": N, "C": C, "M": M, "prior": True, "T": 2.0, "dtype": "float32",
                 "logits_mb": round(N * C * 4 / MIB, 1)}

        def fwd(impl):
            return kernels.kl_distill(leaves[0], t, 2.0, prior, impl=impl)
    else:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")

    def step(impl):
        for leaf in leaves:
            leaf.grad = None
        out = fwd(impl)
        out.backward(upstream)
        del out

    return shape, step, leaves


# ----------------------------------------------------------------------------- one measurement

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


def _cpu_peak_mb(run):
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


def measure_one(op, impl, measure, repeat=3, teachers=1):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, step, leaves = make_case(op, device, teachers)
    step(impl)                                                          # warm-up (compiles kernels)
    for leaf in leaves:
        leaf.grad = None
    rec = {"op": op, "impl": impl, "shape": shape}
    if device == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(impl)
        torch.cuda.synchronize()
        rec["peak_mb"] = round((torch.cuda.max_memory_allocated() - base) / MIB, 1)
        rec["ms"] = round(triton.testing.do_bench(lambda: step(impl), return_mode="median"), 3)
        rec["device"] = torch.cuda.get_device_name()
        rec["mem_method"] = "cuda-max-allocated"
    elif measure == "memory":
        peak, method = _cpu_peak_mb(lambda: step(impl))
        rec["peak_mb"] = round(peak, 1)
        rec["mem_method"] = method
    else:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            step(impl)
            times.append((time.perf_counter() - t0) * 1000)
        rec["ms"] = round(statistics.median(times), 1)
        rec["device"] = f"cpu x{torch.get_num_threads()} threads"
    return rec


# ----------------------------------------------------------------------------- driver

def _child(args, env, timeout):
    cmd = [sys.executable, "-m", "kernels.bench"] + args
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {res.returncode}: {tail}"}
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    ap.add_argument("--impls", default=None, help="comma-separated impls (default: reference,torch "
                    "and, with CUDA, triton)")
    ap.add_argument("--teachers", default="1,2", help="kl_distill teacher counts (default 1,2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs on CPU (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per measurement process")
    ap.add_argument("--one", nargs=2, metavar=("OP", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("memory", "time"), default="time", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        op, impl = args.one
        print(json.dumps(measure_one(op, impl, args.measure, args.repeat, int(args.teachers.split(",")[0]))),
              flush=True)
        return 0

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"error: unknown op(s) {bad}; choose from {list(OPS)}", file=sys.stderr)
        return 2
    import torch
    cuda = torch.cuda.is_available()
    impls = args.impls.split(",") if args.impls else ["reference", "torch"] + (["triton"] if cuda else [])
    env_time = dict(os.environ)
    env_time.pop("TRITON_INTERPRET", None)
    env_mem = dict(env_time, MALLOC_MMAP_THRESHOLD_="65536")
    for op in ops:
        for m in ([int(x) for x in args.teachers.split(",")] if op == "kl_distill" else [1]):
            for impl in impls:
                base = ["--one", op, impl, "--teachers", str(m), "--repeat", str(args.repeat),
                        "--threads", str(args.threads)]
                if cuda:
                    rec = _child(base, env_time, args.timeout)
                else:
                    rec = _child(base + ["--measure", "memory"], env_mem, args.timeout)
                    if "error" not in rec:
                        t = _child(base + ["--measure", "time"], env_time, args.timeout)
                        rec["ms"] = t.get("ms")
                        rec["device"] = t.get("device", t.get("error"))
                rec = {"op": op, "impl": impl, **{k: v for k, v in rec.items() if k not in ("op", "impl")}}
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
