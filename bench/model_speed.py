"""CPU (or CUDA) timing of the LINK network on the tiny VLM config.

    python -m bench.model_speed [--batch 4] [--humans 6] [--objects 8] [--repeats 10] [--impl auto]
                                [--box-guidance mask|pe|both]

Prints forward (eval, no grad) and forward + backward (train, with targets) time per batch
(wall and process CPU time) and peak memory: the process's peak resident set size on CPU (it includes the Python process
itself, so the model's share is the growth over the baseline printed first), or
torch.cuda.max_memory_allocated on CUDA.
"""
import argparse
import resource
import statistics
import time

import torch

from model import LINK, LINKConfig
from vlm import register_tiny_vlm


def toy_batch(B, n_h, n_o, size=64, K_objects=4, seed=0):
    """B images of size x size with n_h humans and n_o objects each, and a few GT pairs."""
    g = torch.Generator().manual_seed(seed)
    dets, targets = [], []
    for _ in range(B):
        n = n_h + n_o
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = torch.rand(n, 2, generator=g) * size * 0.3 + 2
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.cat([torch.zeros(n_h, dtype=torch.long), torch.randint(1, K_objects, (n_o,), generator=g)])
        dets.append({"boxes": boxes, "scores": torch.rand(n, generator=g) * 0.7 + 0.3, "labels": labels})
        targets.append({"boxes_h": boxes[:2], "boxes_o": boxes[n_h:n_h + 2], "hoi": torch.tensor([2, 3])})
    return dets, targets


def peak_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    ap = argparse.ArgumentParser(prog="python -m bench.model_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--humans", type=int, default=6)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--box-guidance", default="mask", choices=["mask", "pe", "both"])
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base_import = peak_mb()  # torch, open_clip, timm imported; no model yet
    objects = ["person", "cup", "dog", "bicycle"]
    cs = dict(prompts=[f"a photo of a person holding a {o}" for o in objects] * 2,
              object_names=objects, hoi_object=[[o] for o in range(4)] * 2, person_label=0)
    cfg = LINKConfig(vlm=register_tiny_vlm(), pretrained=None, image_size=64, d_model=64,
                     d_latent=32, heads=4, impl=args.impl, box_guidance=args.box_guidance)
    torch.manual_seed(0)
    model = LINK(cfg, cs).to(dev)
    images = torch.randn(args.batch, 3, 64, 64, device=dev)
    dets, targets = toy_batch(args.batch, args.humans, args.objects)
    sizes = [(64, 64)] * args.batch
    t = time.perf_counter()
    feats = model.encode_images(images)
    t_vlm = time.perf_counter() - t

    def timed(fn):
        """(median wall seconds, median process CPU seconds) per call; CPU time is what a
        shared machine's load does not inflate (all threads summed)."""
        fn()  # warm-up
        wall, cpu = [], []
        for _ in range(args.repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return statistics.median(wall), statistics.median(cpu)

    def fwd():
        with torch.no_grad():
            return model.eval()(feats, dets, sizes)

    def fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        model(feats, dets, sizes, targets)["loss"].backward()

    P = len(fwd()["pair_image"])
    t_f = timed(fwd)
    t_fb = timed(fwd_bwd)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_vlm = sum(p.numel() for p in model.vlm.parameters())
    print(f"device={dev} impl={args.impl} box_guidance={args.box_guidance} threads={torch.get_num_threads()} "
          f"batch={args.batch} humans={args.humans} objects={args.objects} pairs={P} grid={tuple(feats.shape[2:])}")
    print(f"params: trainable {n_train / 1e6:.3f} M, frozen VLM image tower {n_vlm / 1e6:.3f} M")
    print(f"VLM encode_images (first call): {t_vlm * 1e3:.1f} ms")
    print(f"forward (eval, no grad):        {t_f[0] * 1e3:.1f} ms wall, {t_f[1] * 1e3:.1f} ms CPU / batch "
          f"(medians of {args.repeats})")
    print(f"forward + backward (train):     {t_fb[0] * 1e3:.1f} ms wall, {t_fb[1] * 1e3:.1f} ms CPU / batch "
          f"(medians of {args.repeats})")
    label = "CUDA max allocated" if dev == "cuda" else "process peak RSS"
    print(f"peak memory ({label}): {peak_mb():.1f} MiB (before the model was built: {base_import:.1f} MiB)")


if __name__ == "__main__":
    main()
