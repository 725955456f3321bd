"""GPU check: the fused kernels and a real LINK training step on one GPU, in one command.

    python -m bench.gpu_check --quick --out DIR      # correctness at small sizes, one timing per op (~1.5 min)
    python -m bench.gpu_check --out DIR              # everything (< ~8 min on an H100 / H200)
    python -m bench.gpu_check --cpu-smoke --out DIR  # no GPU (also automatic): same code paths, tiny shapes,
                                                     # Triton interpreter; for CI, measures no speed
    bash bench/gpu_check.sh ARGS                     # the same after installing the wheels carried in .whl/

Writes DIR/gpu_check.json, rewritten atomically after every item (a killed run keeps what it
measured), and DIR/gpu_check.md (the tables). Every item runs guarded: a failure is recorded
(one-line error + traceback tail) and the rest still runs; under an internal budget
(--budget-s) the items that no longer fit are recorded as skipped. Sections:
1. env          GPU, driver, CUDA, torch, triton, Python, open_clip versions.
2. correctness  every op of kernels/ (OP_CASES, plus optional ops found by importlib), impls triton /
                torch / reference, fp32 / bf16 / fp16, forward and every gradient against the float64
                reference on the same inputs: pass when the relative L2 error is within TOL[dtype].
3. speed        forward + backward at the benchmark sizes of bench/kernels.py: ms (do_bench median)
                and peak memory for triton / torch / reference and what a GPU user would otherwise
                pick (SDPA with a float mask, compiled FlexAttention, the naive KL compiled).
4. train        one LINK training step at a realistic shape (3,480 pairs, 600 classes, width 512,
                bf16 autocast): teacher and student with one and two teachers, per impl: ms, peak
                memory, and the first step's loss at identical weights (must agree across impls).
"""
import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable

# Relative L2 error against the float64 reference on the same rounded inputs (METHOD: fp32
# lands far under 1e-3; bf16 operands between 1e-3 and 1e-2).
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
SECTIONS = ("env", "correctness", "speed", "train", "compiled")


# ----------------------------------------------------------------------------- results file

def _clean(x):
    """JSON-safe copy: non-finite floats become strings (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _atomic_write(path, text):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Report:
    """Everything measured; DIR/gpu_check.json and .md rewritten atomically after every item."""

    def __init__(self, out_dir, mode, budget_s, argv):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.t0 = out_dir, time.monotonic()
        self.deadline = self.t0 + budget_s
        self.data = {"mode": mode, "argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "budget_s": budget_s, "elapsed_s": 0.0, "env": {}, "optional_ops": {},
                     "items": [], "correctness": [], "speed": [], "train": []}

    def elapsed(self):
        return time.monotonic() - self.t0

    def left(self):
        return self.deadline - time.monotonic()

    def add(self, table, row):
        self.data[table].append(row)
        self.save()

    def save(self):
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.data["summary"] = summarize(self.data)
        _atomic_write(os.path.join(self.out_dir, "gpu_check.json"), json.dumps(_clean(self.data), indent=1))
        _atomic_write(os.path.join(self.out_dir, "gpu_check.md"), markdown(self.data))


def log(rep, msg):
    print(f"[{rep.elapsed():6.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def _alarm(seconds):
    """Raise TimeoutError in the main thread after `seconds` (a hung compile cannot eat the run)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"item exceeded its {seconds:.0f} s limit")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_item(rep, section, name, fn, est_s, cap_s=240):
    """Run fn() guarded; record status, seconds, and on failure the one-line error and the
    traceback tail. Skipped (and recorded) when less than est_s of the budget is left."""
    rec = {"section": section, "item": name}
    if rep.left() < est_s:
        rec.update(status="skipped", reason=f"budget: {rep.left():.0f} s left, item needs ~{est_s:.0f} s")
        log(rep, f"{section}: {name}: SKIPPED ({rec['reason']})")
        rep.add("items", rec)
        return None
    log(rep, f"{section}: {name} ...")
    t = time.monotonic()
    result = None
    try:
        with _alarm(min(cap_s, rep.left() + 5)):
            result = fn()
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one item's failure must not stop the check
        rec.update(status="failed", error=_one_line(e), traceback=traceback.format_exc()[-2500:])
        log(rep, f"{section}: {name}: FAILED {rec['error']}")
    rec["seconds"] = round(time.monotonic() - t, 2)
    _free_cuda()
    rep.add("items", rec)
    return result


def _one_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]


def _free_cuda():
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- op cases

@dataclass
class OpCase:
    """One op under test. build(gen, **size) -> (inputs, fixed, grad_names): `inputs` are float
    tensors cast to the dtype under test (fp32 masters), `fixed` stay as built (indices, boxes,
    priors, grid); call(impl, **inputs, **fixed) -> tuple of outputs; outputs listed in `diff`
    get a random upstream gradient."""
    name: str
    build: Callable
    call: Callable
    sizes: dict
    diff: tuple = (0,)
    impls: tuple = ("triton", "torch")
    out_names: tuple = ("out",)
    timed: bool = True            # in the speed section (at "bench" on a GPU, "smoke" / "odd" on CPU)
    dtypes: tuple = ()            # () = every dtype checked


def _rand_boxes(n, g, torch):
    """n random normalised xyxy boxes [n, 4] (some zero-area, some leaving the image)."""
    xy = torch.rand(n, 2, generator=g) * 1.1 - 0.05
    wh = torch.rand(n, 2, generator=g) * 0.4
    wh[::7] = 0.0
    return torch.cat([xy, xy + wh], 1)


def build_box_attention(g, P, B, Hd, grid, D, even=False):
    """Inputs of kernels.box_attention. even: pairs sorted by image, P / B each (the layout of
    bench/kernels.py, which SDPA / FlexAttention need); else shuffled with an empty image."""
    import torch
    T = grid[0] * grid[1]
    if even:
        pair_image = torch.arange(B).repeat_interleave(P // B)
    else:
        pair_image = torch.randint(0, B, (P,), generator=g)
        pair_image[pair_image == 1] = 0                                  # image 1 has no pair
    bh, bo = _rand_boxes(P, g, torch), _rand_boxes(P, g, torch)
    union = torch.cat([torch.minimum(bh[:, :2], bo[:, :2]), torch.maximum(bh[:, 2:], bo[:, 2:])], 1)
    inputs = {"q": torch.randn(P, Hd, D, generator=g), "k": torch.randn(B, Hd, T, D, generator=g),
              "v": torch.randn(B, Hd, T, D, generator=g), "strength": torch.randn(Hd, 3, generator=g)}
    fixed = {"pair_image": pair_image, "boxes": torch.stack([bh, bo, union], 1), "grid": tuple(grid)}
    return inputs, fixed, ("q", "k", "v", "strength")


def call_box_attention(impl, q, k, v, strength, pair_image, boxes, grid):
    import kernels
    return (kernels.box_attention(q, k, v, pair_image, boxes, strength, grid, impl=impl),)


def build_pair_enum(g, N, H, D, Do):
    """Inputs of kernels.pair_enum: every one of the first H boxes paired with every other box."""
    import torch
    hh, oo = torch.meshgrid(torch.arange(H), torch.arange(N), indexing="ij")
    keep = hh != oo
    inputs = {"q": torch.randn(N, D, generator=g), "w1": torch.randn(Do, D, generator=g) / D ** 0.5,
              "w2": torch.randn(Do, D, generator=g) / D ** 0.5, "b": torch.randn(Do, generator=g)}
    scale = torch.tensor([640.0, 480.0, 640.0, 480.0])                       # pixel boxes, 640 x 480
    fixed = {"boxes": _rand_boxes(N, g, torch).clamp(0, 1) * scale, "idx_h": hh[keep], "idx_o": oo[keep],
             "image_wh": scale[:2].expand(N, 2).contiguous()}
    return inputs, fixed, ("q", "w1", "w2", "b")


def call_pair_enum(impl, q, w1, w2, b, boxes, idx_h, idx_o, image_wh):
    import kernels
    return tuple(kernels.pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, impl=impl, image_wh=image_wh))


def build_kl(g, N, C, M, prior=True):
    """Inputs of kernels.kl_distill: logits ~ 3 N(0, 1); a detection prior in (0, 1] with half of
    the entries 0 (masked), a few exactly 1, one row fully masked (as bench/kernels.py, plus edges)."""
    import torch
    inputs = {"student": torch.randn(N, C, generator=g) * 3, "teacher": torch.randn(M, N, C, generator=g) * 3}
    fixed = {"prior": None, "temperature": 2.0}
    if prior:
        p = 1.0 - torch.rand(N, C, generator=g)
        p[torch.rand(N, C, generator=g) < 0.5] = 0.0
        p[:, :3] = torch.where(p[:, :3] > 0, torch.ones(()), p[:, :3])
        p[N // 2] = 0.0
        fixed["prior"] = p
    return inputs, fixed, ("student",)


def call_kl(impl, student, teacher, prior, temperature):
    import kernels
    return (kernels.kl_distill(student, teacher, temperature, prior, impl=impl),)


def core_cases():
    """The ops of kernels/ today. Sizes: 'odd' small odd shapes (every mode), 'model' the shapes
    the model feeds them (full), 'bench' bench/kernels.py's (full; speed)."""
    return [
        OpCase("box_attention", build_box_attention, call_box_attention, sizes={
            "odd": dict(P=37, B=3, Hd=3, grid=(5, 7), D=12),         # D < 16: the latent-width tile
            "model": dict(P=203, B=2, Hd=8, grid=(14, 14), D=64),
            "bench": dict(P=4096, B=4, Hd=8, grid=(37, 37), D=32, even=True),
            "smoke": dict(P=24, B=2, Hd=2, grid=(4, 5), D=16, even=True)},     # CPU: SDPA / flex paths
            out_names=("out",)),
        OpCase("pair_enum", build_pair_enum, call_pair_enum, sizes={
            "odd": dict(N=23, H=7, D=40, Do=24),
            "model": dict(N=30, H=15, D=256, Do=256),
            "bench": dict(N=128, H=64, D=256, Do=256)},
            out_names=("pair_q", "spatial")),
        OpCase("kl_distill[prior,M=1]", build_kl, call_kl, sizes={
            "odd": dict(N=37, C=117, M=1),
            "model": dict(N=3480, C=600, M=1),
            "bench": dict(N=32768, C=600, M=1)}, out_names=("loss",)),
        OpCase("kl_distill[prior,M=2]", build_kl, call_kl, sizes={
            "odd": dict(N=37, C=117, M=2),
            "bench": dict(N=32768, C=600, M=2)}, out_names=("loss",)),
        OpCase("kl_distill[no prior,M=2]", build_kl, call_kl, sizes={      # map / query levels
            "odd": dict(N=37, C=72, M=2, prior=False),
            "model": dict(N=8 * 1369, C=64, M=2, prior=False)}, out_names=("loss",), timed=False),
    ]


# --------------------------------------------------------------- optional ops (found by importlib)
# Other work may add ops; their cases are built when importlib finds them. The lead adjusts the
# call forms here when an op lands with another signature.

def build_focal(g, P, K):
    """Inputs of a fused focal loss (model.focal_loss's signature): logits, prior with zeros and
    ones, 0/1 labels."""
    import torch
    p = torch.rand(P, K, generator=g)
    p[torch.rand(P, K, generator=g) < 0.6] = 0.0
    p[:, :2] = torch.where(p[:, :2] > 0, torch.ones(()), p[:, :2])
    labels = (torch.rand(P, K, generator=g) < 0.05).float()
    return {"logits": torch.randn(P, K, generator=g) * 4}, {"prior": p, "labels": labels}, ("logits",)


def _find_focal():
    try:
        mod = importlib.import_module("kernels.focal_loss")
    except ModuleNotFoundError:
        return None, "kernels/focal_loss.py not found"
    fn = getattr(mod, "focal_loss", None)
    if fn is None or "impl" not in inspect.signature(fn).parameters:
        return None, "kernels/focal_loss.py has no focal_loss(..., impl=)"

    def call(impl, logits, prior, labels):
        return (fn(logits, prior, labels, impl=impl),)
    return OpCase("focal_loss", build_focal, call, sizes={
        "odd": dict(P=37, K=117), "model": dict(P=3480, K=600), "bench": dict(P=32768, K=600)},
        out_names=("loss",)), "kernels.focal_loss.focal_loss"


def _find_sigmoid_kl():
    """The per-class sigmoid (Bernoulli) logit distillation, kernels/kl_distill_sigmoid.py."""
    try:
        mod = importlib.import_module("kernels.kl_distill_sigmoid")
    except ModuleNotFoundError:
        return None, "kernels/kl_distill_sigmoid.py not found"

    def call(impl, student, teacher, prior, temperature):
        return (mod.kl_distill_sigmoid(student, teacher, temperature, prior, impl=impl),)
    return call, "kernels.kl_distill_sigmoid.kl_distill_sigmoid"


def optional_cases(rep):
    """Cases of the optional ops that exist here; what was looked for goes into the report."""
    cases = []
    case, where = _find_focal()
    rep.data["optional_ops"]["focal_loss"] = where
    if case:
        cases.append(case)
    call, where = _find_sigmoid_kl()
    rep.data["optional_ops"]["kl_distill_sigmoid"] = where
    if call:
        cases.append(OpCase("kl_distill_sigmoid[prior,M=2]", build_kl, call, sizes={
            "odd": dict(N=37, C=117, M=2), "model": dict(N=3480, C=600, M=2),
            "bench": dict(N=32768, C=600, M=2)}, out_names=("loss",)))
    return cases


def fault_case():
    """A deliberately broken op (--inject-fault): box attention whose 'triton' output is scaled by
    1.05, so every error is ~5e-2 relative; the check must record it as failed."""
    def call(impl, **t):
        out = call_box_attention(impl, **t)
        return tuple(o * 1.05 for o in out) if impl == "triton" else out
    return OpCase("box_attention[injected fault]", build_box_attention, call, sizes={
        "odd": dict(P=37, B=3, Hd=3, grid=(5, 7), D=12)}, out_names=("out",), timed=False, dtypes=("float32",))


# ----------------------------------------------------------------------------- correctness

def _dtype(name):
    import torch
    return getattr(torch, name)


def _to_device(fixed, device):
    import torch
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in fixed.items()}


def _outputs_and_grads(case, impl, inputs, fixed, grad_names, upstream=None, seed=1):
    """Run case.call(impl) on fresh leaves -> (outputs, gradients, upstream). upstream: one
    gradient per output in case.diff; None draws them (seeded, 2 N(0, 1))."""
    import torch
    leaves = {k: v.detach().clone().requires_grad_(k in grad_names) for k, v in inputs.items()}
    outs = case.call(impl, **leaves, **fixed)
    if upstream is None:
        gu = torch.Generator().manual_seed(seed)
        upstream = [torch.randn(outs[i].shape, generator=gu, dtype=torch.float64).to(outs[i].device) * 2
                    for i in case.diff]
    if case.diff:
        torch.autograd.backward([outs[i] for i in case.diff],
                                [u.to(outs[i].dtype) for i, u in zip(case.diff, upstream)])
    return [o.detach() for o in outs], {k: leaves[k].grad for k in grad_names}, upstream


def compare(got, ref):
    """max abs error, relative L2 error ||got - ref|| / ||ref|| (absolute when ref is 0); non-finite
    values in got where ref is finite count as infinite error.

    ref (float64) is first rounded to got's dtype where that stays finite: an output can be no
    closer than that. It matters for fp16 gradients of a mean over 2e7 entries, most of which lie
    below fp16's smallest normal (6e-5): measured on an H200, 4-5 % relative error for every impl
    and the fp16 reference alike, all of it the dtype's rounding of subnormals."""
    import torch
    if got is None:
        return {"max_abs": float("inf"), "rel_l2": float("inf"), "note": "missing"}
    ref = ref.detach().to(got.device)
    rounded = ref.to(got.dtype) if got.is_floating_point() else ref
    ref = torch.where(torch.isfinite(rounded), rounded.to(ref.dtype), ref)
    g, r = got.detach().double().reshape(-1), ref.double().reshape(-1)
    if g.shape != r.shape:
        return {"max_abs": float("inf"), "rel_l2": float("inf"), "note": f"shape {tuple(got.shape)}"}
    fin = torch.isfinite(r)
    if not bool(torch.isfinite(g[fin]).all()) or not bool(torch.equal(torch.isfinite(g), fin)):
        return {"max_abs": float("inf"), "rel_l2": float("inf"), "note": "non-finite"}
    d = (g - r)[fin]
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    nr = float(r[fin].norm())
    return {"max_abs": max_abs, "rel_l2": float(d.norm()) / nr if nr > 0 else max_abs}


def check_case(case, size, dtype_name, device, seed=0):
    """Every impl of one case at one size and dtype (and the reference in that dtype, as a
    baseline) vs the reference in float64 on the same rounded inputs -> rows."""
    import torch
    g = torch.Generator().manual_seed(seed)
    master, fixed, grad_names = case.build(g, **case.sizes[size])
    fixed = _to_device(fixed, device)
    rounded = {k: v.to(_dtype(dtype_name)).to(device) for k, v in master.items()}   # what every impl sees
    ref64 = {k: v.to(torch.float64) for k, v in rounded.items()}
    ref_outs, ref_grads, upstream = _outputs_and_grads(case, "reference", ref64, fixed, grad_names, None, seed + 1)
    rows = []
    for impl in tuple(case.impls) + ("reference",):
        t = time.monotonic()
        row = {"op": case.name, "size": size, "shape": _shape_str(case.sizes[size]), "dtype": dtype_name,
               "impl": impl, "role": "baseline" if impl == "reference" else "kernel", "tol_rel_l2": TOL[dtype_name]}
        try:
            outs, grads, _ = _outputs_and_grads(case, impl, rounded, fixed, grad_names, upstream)
            errs = {n: compare(o, r) for n, o, r in zip(case.out_names, outs, ref_outs)}
            errs.update({f"d{k}": compare(grads[k], ref_grads[k]) for k in grad_names})
            worst = max(errs, key=lambda n: errs[n]["rel_l2"])
            row.update(errors=errs, worst=worst, worst_rel_l2=errs[worst]["rel_l2"],
                       passed=all(e["rel_l2"] <= TOL[dtype_name] for e in errs.values()))
        except Exception as e:  # noqa: BLE001 - one impl's failure is a row, not the end
            row.update(passed=False, error=_one_line(e), traceback=traceback.format_exc()[-1500:])
        row["seconds"] = round(time.monotonic() - t, 3)
        rows.append(row)
    return rows


def _shape_str(size):
    return ", ".join(f"{k}={v}" for k, v in size.items() if k != "even")


def section_correctness(rep, cases, sizes, dtypes, device):
    for size in sizes:
        for case in cases:
            if size not in case.sizes:
                continue
            for dt in [d for d in dtypes if not case.dtypes or d in case.dtypes]:
                est = 25 if size == "bench" else 6
                rows = run_item(rep, "correctness", f"{case.name} {size} {dt}",
                                lambda: check_case(case, size, dt, device), est)
                for row in rows or []:
                    mark = "pass" if row.get("passed") else "FAIL"
                    detail = row.get("error") or f"worst {row['worst']} rel {row['worst_rel_l2']:.2e}"
                    log(rep, f"    {row['impl']:<9} {mark}  {detail}")
                    rep.add("correctness", row)


# ----------------------------------------------------------------------------- timing and memory

def measure(step, device, quick=False, clear=lambda: None):
    """(ms median, peak MiB above what was allocated before, method) of step() (forward + backward).
    CUDA: triton.testing.do_bench median (CUDA events as fallback), max_memory_allocated. CPU:
    one wall-clock run, which under the Triton interpreter is no speed (is_speed False). clear()
    drops the warm-up's gradients before the baseline (gradients count in the peak)."""
    step()                                                               # warm-up: compiles
    clear()                                                              # gradients of the warm-up
    if device != "cuda":
        t = time.perf_counter()
        step()
        return {"ms": round((time.perf_counter() - t) * 1000, 2), "peak_mib": None, "is_speed": False,
                "timer": "cpu wall clock, 1 run (code path only)"}
    from bench.measure import cuda_peak_mb
    peak = cuda_peak_mb(step)
    warm, rep = (10, 50) if quick else (25, 150)
    try:
        import triton.testing
        ms, timer = triton.testing.do_bench(step, warmup=warm, rep=rep, return_mode="median"), "do_bench median"
    except Exception as e:  # noqa: BLE001 - fall back to plain CUDA events
        ms, timer = cuda_event_ms(step, 10), f"cuda events median (do_bench failed: {_one_line(e)})"
    return {"ms": round(ms, 4), "peak_mib": round(peak, 1), "is_speed": True, "timer": timer}


def cuda_event_ms(step, n):
    import torch
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def make_step(case, impl_call, size, dtype_name, device, seed=0):
    """(step() = forward + backward with fixed leaves and upstream, leaves, fixed) for a case;
    a case with no differentiable output (case.diff empty) runs forward only."""
    import torch
    g = torch.Generator().manual_seed(seed)
    master, fixed, grad_names = case.build(g, **case.sizes[size])
    fixed = _to_device(fixed, device)
    dt = _dtype(dtype_name)
    grad_names = grad_names if case.diff else ()
    leaves = {k: v.to(device, dt).requires_grad_(k in grad_names) for k, v in master.items()}
    state = {}

    def step():
        for t in leaves.values():
            t.grad = None
        outs = impl_call(**leaves, **fixed)
        if not case.diff:
            return
        if "up" not in state:
            gu = torch.Generator().manual_seed(seed + 1)
            state["up"] = [torch.randn(outs[i].shape, generator=gu).to(device, outs[i].dtype) for i in case.diff]
        torch.autograd.backward([outs[i] for i in case.diff], state["up"])
    return step, leaves, fixed


def speed_row(case, label, impl_call, size, dtype_name, device, quick=False, check=False):
    """One speed measurement; check: also compare output and gradients with the fp64 reference."""
    step, leaves, fixed = make_step(case, impl_call, size, dtype_name, device)
    row = {"op": case.name, "impl": label, "size": size, "shape": _shape_str(case.sizes[size]),
           "dtype": dtype_name, "device": device, "backward": bool(case.diff)}
    row.update(measure(step, device, quick, clear=lambda: [setattr(t, "grad", None) for t in leaves.values()]))
    if check:
        row["check"] = check_alternative(case, impl_call, leaves, fixed)
    for t in leaves.values():
        t.grad = None
    return row


def check_alternative(case, impl_call, leaves, fixed):
    """Output and gradients of an alternative implementation vs the reference in float64."""
    import torch
    grad_names = [k for k, v in leaves.items() if v.requires_grad]
    inputs = {k: v.detach() for k, v in leaves.items()}
    ref = _outputs_and_grads(case, "reference", {k: v.to(torch.float64) for k, v in inputs.items()}, fixed,
                             grad_names, None, 7)
    alt = replace(case, call=lambda impl, **t: impl_call(**t))
    got = _outputs_and_grads(alt, "alternative", inputs, fixed, grad_names, ref[2])
    errs = {n: compare(a, r) for n, a, r in zip(case.out_names, got[0], ref[0])}
    errs.update({f"d{k}": compare(got[1][k], ref[1][k]) for k in grad_names})
    return errs


def box_attention_sdpa(q, k, v, strength, pair_image, boxes, grid):
    """What a GPU user would write: the box bias materialised as a float mask for SDPA. Needs the
    even layout (pairs sorted by image, P / B each)."""
    import torch.nn.functional as F

    import kernels
    B, L = k.shape[0], q.shape[0] // k.shape[0]
    bias = kernels.box_bias(boxes, strength, grid)                        # [P, Hd, T]
    mask = bias.view(B, L, *bias.shape[1:]).transpose(1, 2).to(q.dtype)  # [B, Hd, L, T]
    q4 = q.view(B, L, *q.shape[1:]).transpose(1, 2)                       # [B, Hd, L, D]
    out = F.scaled_dot_product_attention(q4, k, v, attn_mask=mask)
    return (out.transpose(1, 2).reshape(q.shape),)


def make_flex(compiled, learn_strength=True):
    """FlexAttention with a score_mod that computes the box bias from the (grown) boxes, as a GPU
    user would write it; compiled as a whole (score_mod built inside, so new inputs of the same
    shape reuse the compiled code). compiled=False runs flex eagerly (CPU smoke: code path only).
    learn_strength=False detaches strength (for a torch without gradients of captured tensors)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from kernels.box_attention import grow_boxes

    def flex_box(q4, k, v, gb, st, gh: int, gw: int):
        def score_mod(score, b, h, q_idx, kv_idx):
            row = kv_idx // gw
            cx = ((kv_idx - row * gw).to(torch.float32) + 0.5) / gw
            cy = (row.to(torch.float32) + 0.5) / gh
            for r in range(3):
                inside = ((cx >= gb[b, q_idx, 4 * r]) & (cy >= gb[b, q_idx, 4 * r + 1])
                          & (cx <= gb[b, q_idx, 4 * r + 2]) & (cy <= gb[b, q_idx, 4 * r + 3]))
                score = score + torch.where(inside, st[h, r], 0.0)
            return score
        return flex_attention(q4, k, v, score_mod=score_mod)
    fn = torch.compile(flex_box, dynamic=False) if compiled else flex_box

    def run(q, k, v, strength, pair_image, boxes, grid):
        B, L = k.shape[0], q.shape[0] // k.shape[0]
        gb = grow_boxes(boxes.float(), grid).reshape(B, L, 12)              # [B, L, 3 boxes x 4]
        st = strength.float() if learn_strength else strength.detach().float()
        q4 = q.view(B, L, *q.shape[1:]).transpose(1, 2)                     # [B, Hd, L, D]
        out = fn(q4, k, v, gb, st, int(grid[0]), int(grid[1]))
        return (out.transpose(1, 2).reshape(q.shape),)
    return run


def _speed_size(case, device):
    if device == "cuda":
        return "bench"
    return "smoke" if "smoke" in case.sizes else "odd"


def section_speed(rep, cases, dtypes, device, quick):
    """fwd + bwd time and memory of every op x impl at the benchmark sizes, and SDPA with a float
    mask for box attention (GPU quick: triton, fp32 only)."""
    impls = ("triton",) if quick else ("triton", "torch", "reference")
    for case in [c for c in cases if c.timed]:
        size = _speed_size(case, device)
        for dt in (("float32",) if quick else dtypes):
            for impl in impls:
                row = run_item(rep, "speed", f"{case.name} {impl} {dt}",
                               lambda: speed_row(case, impl, lambda **t: case.call(impl, **t), size, dt, device,
                                                 quick), 20)
                _add_speed(rep, row)
            if case.name == "box_attention" and not quick:
                row = run_item(rep, "speed", f"{case.name} sdpa-float-mask {dt}",
                               lambda: speed_row(case, "sdpa-float-mask", box_attention_sdpa, size, dt, device,
                                                 check=True), 20)
                _add_speed(rep, row)


def section_compiled(rep, cases, dtypes, device):
    """The torch.compile'd alternatives (slow to compile, so last): FlexAttention with the box
    bias in a score_mod, and the naive KL (kernels' reference) compiled. On CPU both run eagerly
    (code paths only)."""
    import torch

    import kernels
    compiled = device == "cuda"
    byname = {c.name: c for c in cases}
    box = byname.get("box_attention")
    for dt in dtypes if box else ():
        def flex_row(dt=dt, size=_speed_size(box, device)):
            label = "flex-attention" + ("-compiled" if compiled else "-eager, forward only")
            case = box if compiled else replace(box, diff=())      # FlexAttention has no CPU backward
            try:
                return speed_row(case, label, make_flex(compiled), size, dt, device, check=True)
            except Exception as e:  # noqa: BLE001 - e.g. no gradient for captured tensors
                row = speed_row(case, label + " (strength frozen)", make_flex(compiled, False), size, dt,
                                device, check=True)
                row["note"] = f"with a learnable strength: {_one_line(e)}"
                return row
        _add_speed(rep, run_item(rep, "compiled", f"box_attention flex {dt}", flex_row, 60 if compiled else 5))
    naive = torch.compile(kernels.kl_distill_reference, dynamic=False) if compiled else kernels.kl_distill_reference
    label = "naive-compiled" if compiled else "naive-eager"
    for name in ("kl_distill[prior,M=1]", "kl_distill[prior,M=2]"):
        if name not in byname:
            continue
        case = byname[name]

        def call(student, teacher, prior, temperature):
            return (naive(student, teacher if teacher.shape[0] > 1 else teacher[0], temperature, prior),)
        _add_speed(rep, run_item(rep, "compiled", f"{name} {label} float32",
                                 lambda: speed_row(case, label, call, _speed_size(case, device), "float32", device,
                                                   check=True), 45 if compiled else 5))


def _add_speed(rep, row):
    if row:
        log(rep, f"    {row['op']} {row['impl']} {row['dtype']}: {row['ms']} ms, peak {row['peak_mib']} MiB")
        rep.add("speed", row)


# ----------------------------------------------------------------------------- LINK training step

def register_vlm(width):
    """A tiny random open_clip config whose image features have the given width (C = embed_dim):
    the LINK head gets its realistic widths while the VLM itself costs nothing (features are given).
    vlm.register_tiny_vlm fixes embed_dim at 64, hence this one."""
    import open_clip
    name = f"gpucheck-w{width}"
    if name not in open_clip.list_models():
        cfg = {"embed_dim": width,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
               "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1}}
        path = os.path.join(tempfile.mkdtemp(prefix="gpucheck_vlm_"), f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(path)
    return name


def class_space(K=600, n_obj=80):
    """A HICO-DET-sized class space: K classes over n_obj objects (person = 0), K / n_obj verbs each."""
    return {"prompts": [f"a photo of interaction {k}" for k in range(K)],
            "object_names": [f"object {o}" for o in range(n_obj)],
            "hoi_object": [[k * n_obj // K] for k in range(K)], "person_label": 0, "unseen": [], "rare": []}


def build_link(width, seed, device, K=600, **overrides):
    """A LINK model on the tiny VLM of the given width; overrides: LINKConfig fields."""
    import torch
    import torch.nn.functional as F

    import model
    cfg = model.LINKConfig(vlm=register_vlm(width), pretrained=None, image_size=32, **overrides)
    torch.manual_seed(seed)
    text = F.normalize(torch.randn(K, width), dim=1)
    return model.LINK(cfg, class_space(K), text_embed=text).to(device)


def make_batch(B, n_h, n_o, grid, width, device, seed=0, n_teachers=2, n_obj=80, K=600):
    """Random features [B, width, Gh, Gw] (student and each teacher), detections of n_h humans and
    n_o objects per 640x480 image, and 3 ground-truth pairs per image on detected boxes."""
    import torch
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, width, *grid, generator=g).to(device) for _ in range(1 + n_teachers)]
    dets, sizes, targets = [], [], []
    wh_img = torch.tensor([640.0, 480.0])
    classes_of = [[k for k in range(K) if k * n_obj // K == o] for o in range(n_obj)]
    for _ in range(B):
        n = n_h + n_o
        xy = torch.rand(n, 2, generator=g) * 0.7 * wh_img
        boxes = torch.cat([xy, xy + (0.05 + torch.rand(n, 2, generator=g) * 0.25) * wh_img], 1)
        labels = torch.cat([torch.zeros(n_h, dtype=torch.long), torch.randint(1, n_obj, (n_o,), generator=g)])
        scores = 0.2 + 0.8 * torch.rand(n, generator=g)
        hi, oi = torch.randint(0, n_h, (3,), generator=g), n_h + torch.randint(0, n_o, (3,), generator=g)
        hoi = torch.tensor([classes_of[int(labels[j])][0] for j in oi])
        dets.append({"boxes": boxes.to(device), "scores": scores.to(device), "labels": labels.to(device)})
        sizes.append((640.0, 480.0))
        targets.append({"boxes_h": boxes[hi].to(device), "boxes_o": boxes[oi].to(device), "hoi": hoi.to(device)})
    return feats, dets, sizes, targets


def train_step(student, teachers, adapters, opt, batch, grid, impl, amp):
    """One optimiser step as trainer.Trainer.train_step takes it (autocast forward, GT loss +
    train_student.distill_losses against the frozen teachers through the per-teacher adapters,
    backward, clip 0.1, AdamW)."""
    import torch

    import train_student
    feats, dets, sizes, targets = batch
    opt.zero_grad(set_to_none=True)
    ctx = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        out = student(feats[0], dets, sizes, targets=targets)
        loss = out["loss"].float()
        if teachers:
            with torch.no_grad():
                t_outs = [t(f, dets, sizes) for t, f in zip(teachers, feats[1:])]
            kd = train_student.distill_losses(out, grid, t_outs, [grid] * len(teachers),
                                              train_student.KDConfig(impl=impl), adapters)
            loss = loss + sum(v.mean().float() for v in kd.values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g['params']], 0.1)
    opt.step()
    return loss.detach()


def train_row(models, init_state, batch, grid, kind, impl, device, n_time):
    """ms per step (median of n_time) and peak memory of one step config, from identical weights
    (the first step's loss is comparable across impls). CPU: the first step's wall time only."""
    import torch
    student, teachers = models[0], models[1:1 + {"teacher": 0, "student-1T": 1, "student-2T": 2}[kind]]
    student.load_state_dict(init_state)
    for m in models:
        m.cfg.impl = impl
    student.train()
    for t in teachers:                      # frozen, as train_student.Distiller makes them
        t.eval().requires_grad_(False)
    import train_student
    widths = [train_student.kd_widths(t) for t in teachers]
    adapters = train_student.Adapters(train_student.kd_widths(student), widths).to(device) if teachers else None
    params = [p for p in student.parameters() if p.requires_grad] + (list(adapters.parameters()) if adapters else [])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    amp = torch.bfloat16 if device == "cuda" else None
    run = lambda: train_step(student, teachers, adapters, opt, batch, grid, impl, amp)  # noqa: E731
    torch.manual_seed(0)                    # same weights, same dropout masks: losses comparable
    t = time.perf_counter()
    first = float(run())
    row = {"step": kind, "grid": f"{grid[0]}x{grid[1]}", "impl": impl, "amp": str(amp).replace("torch.", ""),
           "pairs": None, "loss_first_step": first}
    if device != "cuda":
        row.update(ms=round((time.perf_counter() - t) * 1000, 1), peak_mib=None, is_speed=False)
        return row
    opt.zero_grad(set_to_none=True)
    from bench.measure import cuda_peak_mb
    row["peak_mib"] = round(cuda_peak_mb(run), 1)
    row["ms"] = round(cuda_event_ms(run, n_time), 2)
    row["is_speed"] = True
    return row


def section_train(rep, device, quick):
    """Teacher step and student steps (1 and 2 teachers) x impl x grid. GPU: 8 images x (15 + 15)
    boxes, default LINK widths, features of width 512. CPU: a tiny batch and a narrow model."""
    if device == "cuda":
        B, n_h, n_o, grids, width, n_time, over = 8, 15, 15, [(14, 14), (37, 37)], 512, 5, {}
    else:
        B, n_h, n_o, grids, width, n_time = 2, 3, 3, [(4, 4)], 64, 1     # the two-teacher step covers
        over = dict(d_model=32, d_latent=16, heads=2)                      # the teacher's code path
    kinds = ("teacher", "student-1T", "student-2T") if device == "cuda" else ("student-2T",)
    impls = ("triton", "torch", "reference")
    if quick:
        grids, kinds, impls = grids[:1], ("student-2T",), ("triton",)
    models = run_item(rep, "train", f"build student + 2 teachers (LINK, C={width}, K=600)",
                      lambda: [build_link(width, s, device, **over) for s in range(3)], 20)
    if not models:
        return
    init_state = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
    for grid in grids:
        batch = make_batch(B, n_h, n_o, grid, width, device)
        for kind in kinds:
            for impl in impls:
                row = run_item(rep, "train", f"{kind} {grid[0]}x{grid[1]} {impl}",
                               lambda: train_row(models, init_state, batch, grid, kind, impl, device, n_time),
                               15 if impl != "reference" else 25)
                if row:
                    row["pairs"] = B * n_h * (n_h + n_o - 1)
                    log(rep, f"    {row['ms']} ms/step, peak {row['peak_mib']} MiB, loss {row['loss_first_step']:.6f}")
                    rep.add("train", row)


# ----------------------------------------------------------------------------- environment

def env_info(device):
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "device": device,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    for mod in ("triton", "open_clip", "numpy"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({_one_line(e)})"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version())
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"], info["sm_clock_mhz"], info["sm_clock_max_mhz"] = \
                [s.strip() for s in q.stdout.strip().splitlines()[0].split(",")]
        except Exception as e:  # noqa: BLE001
            info["driver"] = f"unavailable ({_one_line(e)})"
    return info


# ----------------------------------------------------------------------------- summary and markdown

def summarize(data):
    kern = [r for r in data["correctness"] if r.get("role") == "kernel"]
    items = data["items"]
    return {"correctness_kernel_rows": len(kern), "correctness_kernel_failed": sum(not r.get("passed") for r in kern),
            "failed_checks": sorted({f"{r['op']} {r['size']} {r['dtype']} {r['impl']}"
                                     for r in kern if not r.get("passed")}),
            "items_ok": sum(i["status"] == "ok" for i in items),
            "items_failed": [i["item"] for i in items if i["status"] == "failed"],
            "items_skipped": [i["item"] for i in items if i["status"] == "skipped"]}


def _fmt(x, spec=".3g"):
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _ms(r) -> str:
    """A timing cell: interpreter (CPU) timings are marked as not a speed."""
    return _fmt(r["ms"]) if r.get("is_speed") else f"({_fmt(r['ms'])}, not a speed)"


def _md_table(title, header, align, rows) -> list:
    """Markdown lines of one section's table (none when there are no rows)."""
    if not rows:
        return []
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "| " + align + " |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def _speed_err(r):
    chk = r.get("check")
    if not chk:
        return ""
    worst = max(chk, key=lambda n: chk[n]["rel_l2"])
    return f"{worst} {chk[worst]['rel_l2']:.1e}"


def markdown(data, with_correctness=True):
    """The tables; stdout gets them without the (long) correctness table, whose failures the
    header names."""
    e, s = data["env"], data["summary"]
    L = [f"# GPU check ({data['mode']}), {data['started']}", "",
         f"{e.get('gpu', 'no GPU')}, driver {e.get('driver', '-')}, CUDA {e.get('cuda_runtime', '-')}, "
         f"torch {e.get('torch', '-')}, triton {e.get('triton', '-')}, Python {e.get('python', '-')}, "
         f"open_clip {e.get('open_clip', '-')}; {data['elapsed_s']} s of a {data['budget_s']} s budget.", "",
         f"Correctness: {s['correctness_kernel_rows'] - s['correctness_kernel_failed']} / "
         f"{s['correctness_kernel_rows']} kernel checks pass. Items failed: {len(s['items_failed'])}, "
         f"skipped: {len(s['items_skipped'])}." + (f" Failed checks: {'; '.join(s['failed_checks'])}."
                                                   if s["failed_checks"] else ""), ""]
    L += _md_table("Speed and memory (forward + backward)",
                   ["op", "shape", "dtype", "impl", "ms (median)", "peak MiB above inputs", "worst error vs fp64 ref"],
                   "--- | --- | --- | --- | ---: | ---: | ---",
                   [[r["op"], r["shape"], r["dtype"], r["impl"], _ms(r), _fmt(r["peak_mib"]), _speed_err(r)]
                    for r in data["speed"]])
    L += _md_table("LINK training step",
                   ["step", "grid", "pairs", "impl", "amp", "ms / step", "peak MiB", "first-step loss"],
                   "--- | --- | ---: | --- | --- | ---: | ---: | ---:",
                   [[r["step"], r["grid"], r["pairs"], r["impl"], r["amp"], _ms(r), _fmt(r["peak_mib"]),
                     f"{r['loss_first_step']:.6f}"] for r in data["train"]])
    if data["correctness"] and with_correctness:
        L += ["## Correctness vs the float64 reference (relative L2 error; worst output or gradient)", "",
              "| op | size | shape | dtype | impl | worst | rel L2 | max abs | tol | pass |",
              "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
        for r in data["correctness"]:
            if "error" in r:
                L.append(f"| {r['op']} | {r['size']} | {r['shape']} | {r['dtype']} | {r['impl']} | "
                         f"{r['error'][:80]} | | | | FAIL |")
                continue
            w = r["errors"][r["worst"]]
            ok = "pass" if r["passed"] else "FAIL"
            ok = ok + " (baseline)" if r["role"] == "baseline" else ok
            L.append(f"| {r['op']} | {r['size']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['worst']} | "
                     f"{w['rel_l2']:.1e} | {w['max_abs']:.1e} | {r['tol_rel_l2']:.0e} | {ok} |")
        L.append("")
    bad = [i for i in data["items"] if i["status"] != "ok"]
    if bad:
        L += ["## Failed or skipped items", ""]
        L += [f"- {i['section']}: {i['item']}: {i['status']}: {i.get('error') or i.get('reason')}" for i in bad]
        L.append("")
    if data["optional_ops"]:
        L += ["Optional ops: " + "; ".join(f"{k}: {v}" for k, v in data["optional_ops"].items()), ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small-size correctness + one timing per op")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: tiny shapes under the Triton interpreter (automatic without CUDA)")
    ap.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json / gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="internal time budget (s); later items skip")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--inject-fault", action="store_true", help=argparse.SUPPRESS)  # tests: a broken op
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(sections) - set(SECTIONS):
        print(f"error: --sections: unknown {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}",
              file=sys.stderr)
        return 2
    import torch
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu":  # before kernels/ is imported: @triton.jit reads it at decoration time
        os.environ["TRITON_INTERPRET"] = "1"
        if "kernels" in sys.modules and not sys.modules["kernels._common"].interpreting():
            print("error: kernels/ was imported before TRITON_INTERPRET=1 was set", file=sys.stderr)
            return 2
    mode = "cpu-smoke" if device == "cpu" else ("quick" if args.quick else "full")
    rep = Report(args.out, mode, args.budget_s, sys.argv[1:] if argv is None else list(argv))
    log(rep, f"gpu_check: mode {mode}, device {device}, budget {args.budget_s:.0f} s, out {args.out}")
    rep.data["env"] = run_item(rep, "env", "environment", lambda: env_info(device), 0) or {}
    log(rep, "    " + json.dumps(rep.data["env"]))
    rep.save()
    quick = args.quick or device == "cpu"
    cases = run_item(rep, "correctness", "find ops", lambda: core_cases() + optional_cases(rep), 0) or []
    if args.inject_fault:
        cases.append(fault_case())
    dtypes = ("float32", "bfloat16", "float16") if device == "cuda" else ("float32", "bfloat16")
    torch.backends.cuda.matmul.allow_tf32 = False                          # fp32 means fp32
    if "correctness" in sections:
        section_correctness(rep, cases, ["odd"] if quick else ["odd", "model"], dtypes, device)
    if "speed" in sections:
        section_speed(rep, [c for c in cases if c.timed], ("float32", "bfloat16") if device == "cuda" else ("float32",),
                      device, args.quick)
    if "train" in sections:
        section_train(rep, device, args.quick)
    if "correctness" in sections and not quick:
        section_correctness(rep, cases, ["bench"], dtypes, device)
    if "compiled" in sections and not args.quick:
        section_compiled(rep, cases, ("float32", "bfloat16") if device == "cuda" else ("float32",), device)
    rep.save()
    print("\n" + markdown(rep.data, with_correctness=False), flush=True)
    s = rep.data["summary"]
    log(rep, f"done: {s['correctness_kernel_failed']} kernel checks failed, {len(s['items_failed'])} items failed, "
             f"{len(s['items_skipped'])} skipped; {os.path.join(args.out, 'gpu_check.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
