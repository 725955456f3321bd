"""viz.plot_curves: the training curves the loop writes as runs/NAME/curves.png."""
import io

import numpy as np
from PIL import Image

from viz import plot_curves


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
