"""viz.plot_curves: the training curves the loop writes as runs/NAME/curves.png; viz.plot_ablation;
viz.plot_pretraining."""
import io

import numpy as np
from PIL import Image

from viz import plot_ablation, plot_curves, plot_pretraining


def test_plot_curves_png_of_the_figure_size_with_both_panels_drawn():
    recs = [{"kind": "train", "step": s, "loss": 1.0 / s, "loss_kd_logit": 0.5 / s} for s in range(1, 30)]
    recs += [{"kind": "eval", "epoch": e, "full": 10.0 * e, "rare": 5.0 * e} for e in (1, 2, 3)]
    img = np.asarray(Image.open(io.BytesIO(plot_curves(recs))).convert("RGB"))
    assert img.shape == (320, 800, 3)                     # figsize 10 x 4 inches at 80 dpi
    empty = np.asarray(Image.open(io.BytesIO(plot_curves([]))).convert("RGB"))
    # the curves (coloured, non-grey pixels) sit in both halves; the empty figure has none
    coloured = lambda a: (a.max(-1).astype(int) - a.min(-1).astype(int)) > 60   # noqa: E731
    assert coloured(img[:, :400]).sum() > 200 and coloured(img[:, 400:]).sum() > 200
    assert coloured(empty).sum() == 0


def test_plot_ablation_one_panel_per_table_bars_in_key_colours():
    bars = [("A1", {"full": 40.0, "rare": None}, {"full": 2.0, "rare": None}),
            ("A2", {"full": 60.0, "rare": 30.0}, {"full": None, "rare": 1.0})]
    one = np.asarray(Image.open(io.BytesIO(plot_ablation([("t", ("full", "rare"), bars)]))).convert("RGB"))
    two = np.asarray(Image.open(io.BytesIO(plot_ablation([("t", ("full", "rare"), bars)] * 2))).convert("RGB"))
    assert one.shape == (256, 880, 3) and two.shape == (512, 880, 3)      # 11 x 3.2 inches per panel, 80 dpi
    c0, c1 = (31, 119, 180), (255, 127, 14)                               # matplotlib's C0 (full), C1 (rare)
    assert (one == c0).all(-1).sum() > 1000 and (one == c1).all(-1).sum() > 300


def test_plot_pretraining_png_of_the_figure_size_with_both_panels_drawn():
    curve = {"loss": [5.0 - 0.01 * s for s in range(200)],
             "heldout": [{"epoch": e, "top1": 0.01 * e, "top5": 0.05 * e, "class_map": 0.1 + 0.02 * e,
                          "chance_top1": 0.002} for e in (1, 2, 3)]}
    img = np.asarray(Image.open(io.BytesIO(plot_pretraining(curve, "t"))).convert("RGB"))
    assert img.shape == (324, 900, 3)                     # figsize 10 x 3.6 inches at 90 dpi
    c0, c1, c2 = (31, 119, 180), (255, 127, 14), (44, 160, 44)   # step loss / mean; top1, top5, class_map
    left, right = img[:, :450], img[:, 450:]
    assert (left == c1).all(-1).sum() > 100                # the running mean of the loss
    assert all((right == c).all(-1).sum() > 30 for c in (c0, c1, c2))   # the three held-out curves
