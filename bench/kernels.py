"""Benchmark of the fused ops of kernels/: peak extra memory and time of forward + backward.

    python -m bench.kernels                      # every op, every impl this machine runs
    python -m bench.kernels --ops kl_distill     # a subset (comma-separated)
    python -m bench.kernels --threads 1          # one torch thread (a CPU shared with other jobs)
    python -m bench.kernels --ops box_attention --set P=1024,gh=24,gw=24   # another shape
    python -m bench.kernels --method profiler    # CPU memory as torch.profiler's live tensor bytes
    python -m bench.kernels --cost-model         # box_attention's analytic FLOP / byte counts
    python -m bench.kernels --one kl_distill torch --measure memory   # one measurement (internal)

Prints one JSON object per line: {"op", "impl": "reference" | "torch" | "triton", "shape",
"peak_mb", "ms", "device"}; CPU runs "reference" and "torch", a CUDA machine also "triton".
Shapes: SHAPES below (fp32, seeded random inputs, built by make_case).

Every measurement runs in a fresh process (`--one OP IMPL --measure memory|time`), so one op's
memory never pollutes another's: it builds the inputs, runs forward + backward once as warm-up,
drops the gradients, then measures peak_mb as bench/measure.py says, and ms: on CPU the median
of --repeat wall-clock runs in a second process with the default allocator (the memory
process's mmap threshold would add page-fault time), on CUDA triton.testing.do_bench (median).
"""
import argparse
import json
import statistics
import sys
import time

from bench.measure import MIB, child_envs, cpu_peak_mb, cuda_peak_mb, profiler_peak_mb, run_child

OPS = ("box_attention", "pair_enum", "kl_distill", "kl_distill_sigmoid", "focal_loss")
KL_OPS = ("kl_distill", "kl_distill_sigmoid")   # measured with each teacher count of --teachers


# ----------------------------------------------------------------------------- inputs

def _boxes(n, g, torch):
    """n random normalised xyxy boxes [n, 4]."""
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = 0.02 + torch.rand(n, 2, generator=g) * 0.28
    return torch.cat([xy, xy + wh], 1)


# Benchmark shape of each op; `--set KEY=VALUE,...` overrides (the tests use tiny ones).
SHAPES = {
    # P pairs over B images, Hd heads, T = gh x gw tokens; gradients to q, k, v, strength
    "box_attention": {"P": 4096, "B": 4, "Hd": 8, "gh": 37, "gw": 37, "D": 32},
    # N boxes of one image, the first H humans, each paired with every other box; gradients to q, w1, w2, b
    "pair_enum": {"N": 128, "H": 64, "D": 256, "Do": 256},
    # N rows x C classes, T = 2, a prior (half masked), M = 1 and 2 teachers; gradient to the student
    "kl_distill": {"N": 32768, "C": 600},
    "kl_distill_sigmoid": {"N": 32768, "C": 600},
    # the same kind of prior, ~1% positive labels, alpha 0.5, gamma 0.2; gradient to the logits
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

def _child(args, env, timeout):
    return run_child([sys.executable, "-m", "bench.kernels"] + args, env, timeout)


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
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
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
