"""Benchmark of the fused ops: peak extra memory and time of forward + backward.

    python -m kernels.bench                      # every op, every impl this machine runs
    python -m kernels.bench --ops kl_distill     # a subset (comma-separated)
    python -m kernels.bench --threads 1          # one torch thread (a CPU shared with other jobs)
    python -m kernels.bench --ops box_attention --set P=1024,gh=24,gw=24   # another shape
    python -m kernels.bench --method profiler    # CPU memory as torch.profiler's live tensor bytes
    python -m kernels.bench --cost-model         # box_attention's analytic FLOP / byte counts
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
- kl_distill (softmax form) and kl_distill_sigmoid (per-class Bernoulli form, reduction "sum"):
  N = 32,768 rows x C = 600 classes, T = 2, a detection prior (uniform in (0, 1], half of the
  entries 0 = masked), M = 1 teacher and M = 2 teachers; gradient to the student.
- focal_loss: N = 32,768 rows x C = 600 classes, the same kind of prior, about 1% positive
  labels (float), alpha 0.5, gamma 0.2; gradient to the logits.

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
  --method profiler instead: the peak of live tensor bytes from torch.profiler's memory events
  (allocator level, exact, slow; what the memory test of tests/test_box_attention.py uses).
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

OPS = ("box_attention", "pair_enum", "kl_distill", "kl_distill_sigmoid", "focal_loss")
KL_OPS = ("kl_distill", "kl_distill_sigmoid")   # measured with each teacher count of --teachers
MIB = 1 << 20


# ----------------------------------------------------------------------------- inputs

def _boxes(n, g, torch):
    """n random normalised xyxy boxes [n, 4]."""
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = 0.02 + torch.rand(n, 2, generator=g) * 0.28
    return torch.cat([xy, xy + wh], 1)


# Benchmark shape of each op; `--set KEY=VALUE,...` overrides (the tests use tiny ones).
SHAPES = {
    "box_attention": {"P": 4096, "B": 4, "Hd": 8, "gh": 37, "gw": 37, "D": 32},
    "pair_enum": {"N": 128, "H": 64, "D": 256, "Do": 256},
    "kl_distill": {"N": 32768, "C": 600},
    "kl_distill_sigmoid": {"N": 32768, "C": 600},
    "focal_loss": {"N": 32768, "C": 600},
}


def _prior(N, C, g, torch):
    """A detection prior [N, C]: uniform in (0, 1], half of the entries 0 (masked classes)."""
    prior = 1.0 - torch.rand(N, C, generator=g)
    prior[torch.rand(N, C, generator=g) < 0.5] = 0.0
    return prior


def make_case(op, device, teachers=1, shape=None):
    """-> (shape dict, step(impl): forward + backward, list of leaf tensors that get gradients).

    shape: optional overrides of SHAPES[op]."""
    import torch

    import kernels

    if op not in SHAPES:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    unknown = set(shape or {}) - set(SHAPES[op])
    if unknown:
        raise ValueError(f"{op}: unknown shape keys {sorted(unknown)}; choose from {sorted(SHAPES[op])}")
    sh = {**SHAPES[op], **(shape or {})}
    g = torch.Generator().manual_seed(0)
    if op == "box_attention":
        P, B, Hd, gh, gw, D = (sh[k] for k in ("P", "B", "Hd", "gh", "gw", "D"))
        T = gh * gw
        q = torch.randn(P, Hd, D, generator=g)
        k = torch.randn(B, Hd, T, D, generator=g)
        v = torch.randn(B, Hd, T, D, generator=g)
        strength = torch.randn(Hd, 3, generator=g)
        pair_image = (torch.arange(P) * B // max(P, 1)).to(device)               # pairs split evenly
        bh, bo = _boxes(P, g, torch), _boxes(P, g, torch)
        union = torch.cat([torch.minimum(bh[:, :2], bo[:, :2]), torch.maximum(bh[:, 2:], bo[:, 2:])], 1)
        boxes = torch.stack([bh, bo, union], 1).to(device)                        # [P, 3, 4]
        upstream = torch.randn(P, Hd, D, generator=g).to(device)
        leaves = [t.to(device).requires_grad_() for t in (q, k, v, strength)]
        shape = {"P": P, "B": B, "Hd": Hd, "T": T, "grid": [gh, gw], "D": D, "dtype": "float32"}

        def fwd(impl):
            return kernels.box_attention(leaves[0], leaves[1], leaves[2], pair_image, boxes,
                                         leaves[3], (gh, gw), impl=impl)
    elif op == "pair_enum":
        N, H, D, Do = (sh[k] for k in ("N", "H", "D", "Do"))
        q = torch.randn(N, D, generator=g)
        w1 = torch.randn(Do, D, generator=g) / D ** 0.5
        w2 = torch.randn(Do, D, generator=g) / D ** 0.5
        b = torch.randn(Do, generator=g)
        image_wh = torch.tensor([[640.0, 480.0]], device=device).expand(N, 2)          # pixel boxes
        boxes = (_boxes(N, g, torch) * torch.tensor([640.0, 480.0, 640.0, 480.0])).to(device)
        hh, oo = torch.meshgrid(torch.arange(H), torch.arange(N), indexing="ij")
        keep = hh != oo
        idx_h, idx_o = hh[keep].to(device), oo[keep].to(device)                 # P = H x (N - 1)
        upstream = torch.randn(idx_h.shape[0], Do, generator=g).to(device)
        leaves = [t.to(device).requires_grad_() for t in (q, w1, w2, b)]
        shape = {"N": N, "humans": H, "P": int(idx_h.shape[0]), "D": D, "Do": Do, "dtype": "float32"}

        def fwd(impl):
            return kernels.pair_enum(leaves[0], boxes, idx_h, idx_o, leaves[1], leaves[2], leaves[3],
                                     impl=impl, image_wh=image_wh)[0]
    elif op == "focal_loss":
        N, C = sh["N"], sh["C"]
        x = torch.randn(N, C, generator=g) * 3
        prior = _prior(N, C, g, torch)
        labels = (torch.rand(N, C, generator=g) < 0.01).float()                 # about 1% positives
        prior, labels = prior.to(device), labels.to(device)
        leaves = [x.to(device).requires_grad_()]
        upstream = None
        shape = {"N": N, "C": C, "alpha": 0.5, "gamma": 0.2, "dtype": "float32", "logits_mb": round(N * C * 4 / MIB, 1)}

        def fwd(impl):
            return kernels.focal_loss(leaves[0], prior, labels, 0.5, 0.2, impl=impl)
    else:   # kl_distill, kl_distill_sigmoid
        N, C, M = sh["N"], sh["C"], teachers
        s = torch.randn(N, C, generator=g) * 3
        t = torch.randn(M, N, C, generator=g) * 3
        t = t[0] if M == 1 else t
        prior = _prior(N, C, g, torch)
        t, prior = t.to(device), prior.to(device)
        leaves = [s.to(device).requires_grad_()]
        upstream = None
        shape = {"N": N, "C": C, "M": M, "prior": True, "T": 2.0, "dtype": "float32",
                 "logits_mb": round(N * C * 4 / MIB, 1)}

        op_fn = getattr(kernels, op)

        def fwd(impl):
            return op_fn(leaves[0], t, 2.0, prior, impl=impl)

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


def peak_mb(op, impl, method="rss", teachers=1, shape=None):
    """Peak extra memory (MiB) of one forward + backward of op on CPU, beyond the inputs and
    including the output and the gradients: method "rss" (cpu_peak_mb; run one op per fresh
    process) or "profiler" (profiler_peak_mb). -> (MiB, method used, shape dict)."""
    shape, step, leaves = make_case(op, "cpu", teachers, shape)
    step(impl)                                                          # warm-up (lazy init)
    for leaf in leaves:
        leaf.grad = None
    if method == "profiler":
        return profiler_peak_mb(lambda: step(impl)), method, shape
    mb, method = cpu_peak_mb(lambda: step(impl))
    return mb, method, shape


# ----------------------------------------------------------------------------- analytic cost

def box_attention_cost(P=4096, Hd=8, T=1369, D=32, B=4, elem=4, block_p=32, block_t=64):
    """box_attention: analytic FLOPs and bytes of forward and backward (fp32 by default: elem = 4 bytes).

    FLOPs: a multiply-add is 2; elementwise work per [P, Hd, T] element: scale 1, bias 6
    (3 multiply-adds of strength by the 0/1 inside masks), softmax 5 (max, sub, exp, sum, div),
    backward dS 3 and d strength 6; inside tests 12 compares per (pair, token).
    Bytes: the reference counts one read or write per pass over a materialised [P, Hd, T]
    tensor (its forward makes ~12 such passes: bias, gathered bias, logits, scaled, biased,
    softmax and the reads of them; backward ~13). The lean torch path makes ~10 (forward) and
    ~22 (backward) passes over [Hd, chunk, T] buffers of <= 4 MiB (cache-sized working set).
    The Triton kernels never materialise [P, Hd, T]: "hbm" is the compulsory traffic (q, out,
    dO, dq, K, V, dK, dV once, 12 box numbers and 2 softmax statistics per row) and "l2" the
    re-reads of K/V per pair block (forward, dq) and of q/dO per token block (dk/dv) of the
    Triton kernels, served by the L2 cache in practice.
    """
    PHT, PHD, BHTD, PT = P * Hd * T, P * Hd * D, B * Hd * T * D, P * T
    mm = 2 * PHT * D                                             # one [P, Hd, T] x D contraction
    fwd = 2 * mm + 12 * PHT + 12 * PT                            # QK^T, PV; scale, bias, softmax
    n_pblk, n_tblk = -(-P // block_p), -(-T // block_t)
    stats = 2 * P * Hd * 4 + 12 * P * 4                          # row max/sum + boxes (fp32)
    hbm_fwd = elem * (2 * PHD + 2 * BHTD) + stats
    hbm_bwd = elem * (4 * PHD + 4 * BHTD) + stats + P * Hd * 4   # + delta
    return {
        "shape": {"P": P, "Hd": Hd, "T": T, "D": D, "B": B, "bytes_per_elem": elem},
        "reference": {
            "fwd_flops": fwd, "bwd_flops": 4 * mm + 10 * PHT,    # dV, dP, dQ, dK; dS; d strength
            "fwd_bytes": elem * (12 * PHT + 2 * PHD + 2 * BHTD) + 2 * 3 * PT * 4,
            "bwd_bytes": elem * (13 * PHT + 4 * PHD + 4 * BHTD) + 3 * PT * 4,
        },
        "torch_lean": {  # backward recomputes QK^T, bias and P once
            "fwd_flops": fwd, "bwd_flops": 5 * mm + 22 * PHT + 12 * PT,
            # not fused: passes over [Hd, chunk, T] buffers of <= 4 MiB, a cache-sized working set
            "fwd_bytes_chunked": elem * (10 * PHT + 2 * PHD + 2 * BHTD),
            "bwd_bytes_chunked": elem * (22 * PHT + 4 * PHD + 4 * BHTD),
        },
        "triton": {  # dq and dk/dv kernels each recompute QK^T, bias, P and dP
            "fwd_flops": fwd, "bwd_flops": 7 * mm + 30 * PHT + 24 * PT,
            "fwd_bytes_hbm": hbm_fwd, "bwd_bytes_hbm": hbm_bwd,
            "fwd_bytes_l2": elem * (n_pblk * Hd * 2 * T * D + 2 * PHD),
            "bwd_bytes_l2": elem * (n_pblk * Hd * 2 * T * D + n_tblk * 2 * PHD + 4 * PHD
                                    + 2 * BHTD),
        },
    }



# ----------------------------------------------------------------------------- one measurement

def measure_one(op, impl, measure, repeat=3, teachers=1, shape=None, method="rss"):
    """One record: peak memory (measure="memory") or time (measure="time") on CPU, both on CUDA."""
    import torch

    if not torch.cuda.is_available():
        if measure == "memory":
            mb, method, shape = peak_mb(op, impl, method, teachers, shape)
            return {"op": op, "impl": impl, "shape": shape, "peak_mb": round(mb, 1), "mem_method": method}
        shape, step, _ = make_case(op, "cpu", teachers, shape)
        step(impl)                                                      # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            step(impl)
            times.append((time.perf_counter() - t0) * 1000)
        return {"op": op, "impl": impl, "shape": shape, "ms": round(statistics.median(times), 1),
                "device": f"cpu x{torch.get_num_threads()} threads"}
    import triton.testing
    shape, step, leaves = make_case(op, "cuda", teachers, shape)
    step(impl)                                                          # warm-up (compiles kernels)
    for leaf in leaves:
        leaf.grad = None
    return {"op": op, "impl": impl, "shape": shape, "peak_mb": round(cuda_peak_mb(lambda: step(impl)), 1),
            "ms": round(triton.testing.do_bench(lambda: step(impl), return_mode="median"), 3),
            "device": torch.cuda.get_device_name(), "mem_method": "cuda-max-allocated"}


# ----------------------------------------------------------------------------- driver

def run_child(cmd, env, timeout, cwd=None):
    """Run one measurement process (cmd) -> the last JSON line it printed, or {"error": ...}
    naming the timeout or the exit code and the last line of its stderr. Also bench_train.py's."""
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
    memory one with glibc's fixed mmap threshold, so that RSS follows the live tensors (see Method)."""
    env_time = dict(os.environ)
    env_time.pop("TRITON_INTERPRET", None)
    return env_time, dict(env_time, MALLOC_MMAP_THRESHOLD_="65536")


def _child(args, env, timeout):
    return run_child([sys.executable, "-m", "kernels.bench"] + args, env, timeout)


def _parse_set(text):
    """"P=192,gh=16" -> {"P": 192, "gh": 16} (integer shape overrides)."""
    out = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, eq, val = item.partition("=")
        if not eq or not val.strip().lstrip("-").isdigit():
            raise ValueError(f"--set: expected KEY=INTEGER, got {item!r}")
        out[key.strip()] = int(val)
    return out


def _parser():
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ", ".join(OPS))
    ap.add_argument("--impls", default=None, help="comma-separated impls (default: reference,torch "
                    "and, with CUDA, triton)")
    ap.add_argument("--teachers", default="1,2", help="teacher counts of the KL ops (default 1,2)")
    ap.add_argument("--set", default="", metavar="KEY=N,...",
                    help="shape overrides for the selected ops, e.g. P=1024,gh=24,gw=24 (see SHAPES)")
    ap.add_argument("--method", choices=("rss", "profiler"), default="rss",
                    help="CPU peak memory: resident set (default) or torch.profiler's live tensor bytes")
    ap.add_argument("--cost-model", action="store_true",
                    help="print box_attention's analytic FLOP / byte counts at its shape and exit")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs on CPU (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per measurement process")
    ap.add_argument("--one", nargs=2, metavar=("OP", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("memory", "time"), default="time", help=argparse.SUPPRESS)
    return ap


def _run_all(args, ops):
    """Every (op, teachers, impl): one process per measurement, one JSON line each."""
    import torch
    cuda = torch.cuda.is_available()
    impls = args.impls.split(",") if args.impls else ["reference", "torch"] + (["triton"] if cuda else [])
    env_time, env_mem = child_envs()
    for op in ops:
        for m in ([int(x) for x in args.teachers.split(",")] if op in KL_OPS else [1]):
            for impl in impls:
                base = ["--one", op, impl, "--teachers", str(m), "--repeat", str(args.repeat),
                        "--threads", str(args.threads), "--set", args.set, "--method", args.method]
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


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.cost_model or args.one:
        ops = ["box_attention"] if args.cost_model else [args.one[0]]
    else:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"error: unknown op(s) {bad}; choose from {list(OPS)}", file=sys.stderr)
        return 2
    try:
        overrides = _parse_set(args.set)
        for op in ops:   # every key must belong to each selected op's shape
            if set(overrides) - set(SHAPES[op]):
                raise ValueError(f"--set: {sorted(set(overrides) - set(SHAPES[op]))} are not shape keys "
                                 f"of {op} ({sorted(SHAPES[op])})")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cost_model:
        sh = {**SHAPES["box_attention"], **overrides}
        print(json.dumps(box_attention_cost(sh["P"], sh["Hd"], sh["gh"] * sh["gw"], sh["D"], sh["B"]),
                         indent=1))
        return 0
    if args.one:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        op, impl = args.one
        rec = measure_one(op, impl, args.measure, args.repeat, int(args.teachers.split(",")[0]), overrides,
                          args.method)
        print(json.dumps(rec), flush=True)
        return 0
    _run_all(args, ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
