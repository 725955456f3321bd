"""Drawing predictions on images (torch-free: numpy and PIL only), used by infer.py and demo.py.

Drawing conventions
-------------------
* The picture is drawn on a canvas made of the image scaled by an INTEGER factor
  ``s = canvas_scale(w, h) = max(1, ceil(512 / max(w, h)))`` (64 px -> 8, 128 px -> 4,
  >= 512 px -> 1) with nearest-neighbour resampling, followed by a legend strip BELOW the
  image.  A point (x, y) of the image's pixel frame lands on canvas pixel
  (floor(x * s), floor(y * s)); the outline of a box [x1, y1, x2, y2] occupies the canvas
  pixels from round(x1 * s) to round(x2 * s) (PIL draws outlines inward, ``line_width(...)``
  pixels thick).  The scale is stored in ``picture.info["link_scale"]`` and the legend's top
  row in ``picture.info["link_legend_top"]``.
* Human boxes are drawn in HUMAN_COLOUR, object boxes in OBJECT_COLOUR, each human-object
  link in LINK_COLOUR (drawn first, so box outlines sit on top of links; a box that is the
  human of one pair and the object of another is drawn as a human).  These three colours are
  drawn exactly (no anti-aliasing) and by nothing else on the image part of the canvas (the
  image's own pixels may of course contain them); pair numbers are white text on a black tag.
* Pairs are numbered by their best score over all rows (``unique_pairs``): #1 is the top pair,
  the number infer's --attention N refers to.
* The legend lists the top triplets: "#pair verb object score".
* An attention map [Gh, Gw] (any non-negative values) is min-max normalised, bilinearly
  resized to the displayed image and alpha-blended (red = high) under the boxes.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HUMAN_COLOUR = (23, 190, 255)     # exact RGB of human box outlines
OBJECT_COLOUR = (255, 96, 17)     # exact RGB of object box outlines
LINK_COLOUR = (250, 232, 41)      # exact RGB of human-object links
TAG_BG = (0, 0, 0)
TAG_FG = (255, 255, 255)
LEGEND_BG = (24, 24, 24)
LEGEND_FG = (235, 235, 235)
CANVAS_TARGET = 512               # the longer side of the displayed image is scaled up to >= this


def canvas_scale(w: int, h: int) -> int:
    """Integer up-scaling factor of the displayed image: max(1, ceil(512 / max(w, h)))."""
    return max(1, math.ceil(CANVAS_TARGET / max(1, w, h)))


def line_width(canvas_w: int, canvas_h: int) -> int:
    """Outline / link thickness in canvas pixels, grows with the canvas: max(2, round(L / 300))."""
    return max(2, round(max(canvas_w, canvas_h) / 300))


def font_size(canvas_w: int, canvas_h: int) -> int:
    """Legend text size in canvas pixels: max(12, round(L / 40))."""
    return max(12, round(max(canvas_w, canvas_h) / 40))


def _font(size: int):
    try:  # Pillow >= 10.1 ships a scalable default font (needs FreeType); no download
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image (1, L, LA, P, RGBA, CMYK, I;16, I, F, ...) -> 8-bit RGB.

    16-bit and 32-bit integer images are scaled by 255 / 65535 (values above 65535 clip);
    float images are taken as [0, 1] when their maximum is <= 1 else as [0, 255].
    Transparent images are composited on white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)                  # [H, W]
        if mode == "F":
            arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        else:
            arr = arr * (255.0 / 65535.0)
        arr = np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.mode == "RGBA":
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def hoi_class_names(cs: dict) -> list:
    """'verb object' per class of a class space dict (e.g. 'ride bicycle'); the prompt where a
    class has no verb."""
    names = []
    for k, prompt in enumerate(cs["prompts"]):
        v = cs["hoi_verb"][k] if k < len(cs.get("hoi_verb", [])) else -1
        objs = cs["hoi_object"][k]
        if v is None or v < 0:
            names.append(str(prompt))
            continue
        obj = cs["object_names"][objs[0]] if len(objs) == 1 else "object"
        names.append(f"{cs['verb_names'][v]} {obj}".replace("_", " "))
    return names


# ----------------------------------------------------------------------------------------------
# attention overlay
# ----------------------------------------------------------------------------------------------

def _heat_rgb(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] [H, W] -> uint8 RGB [H, W, 3] (dark blue -> cyan -> yellow -> red)."""
    stops = np.array([[0, 0, 96], [0, 160, 255], [255, 255, 0], [255, 0, 0]], dtype=np.float64)
    x = np.clip(a, 0, 1) * (len(stops) - 1)
    i = np.minimum(np.floor(x).astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return (stops[i] * (1 - t) + stops[i + 1] * t).round().astype(np.uint8)


def _overlay_attention(img: Image.Image, attention: np.ndarray, alpha: float = 0.55) -> Image.Image:
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim != 2:
        raise ValueError(f"draw_interactions: attention must be [Gh, Gw], got shape {att.shape}")
    att = np.nan_to_num(att)
    lo, hi = float(att.min()), float(att.max())
    norm = (att - lo) / (hi - lo) if hi > lo else np.zeros_like(att)
    small = Image.fromarray((norm * 255).round().astype(np.uint8), mode="L")
    big = np.asarray(small.resize(img.size, Image.BILINEAR), dtype=np.float64) / 255.0  # [H, W]
    heat = _heat_rgb(big).astype(np.float64)
    base = np.asarray(img, dtype=np.float64)
    w = alpha * (0.25 + 0.75 * big[..., None])      # the hot regions stand out, cold ones tint
    out = base * (1 - w) + heat * w
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------------------------
# pairs and their numbers
# ----------------------------------------------------------------------------------------------

def _pair_key(row: np.ndarray) -> tuple:
    """The pair (human box + object box) of a prediction row, rounded so equal boxes match."""
    return tuple(np.round(row[2:], 4))


def unique_pairs(rows: np.ndarray) -> list:
    """Row index (into rows) of the best row of each unique pair, pairs ranked by best score:
    element n - 1 is pair #n of the pictures."""
    seen, out = set(), []
    for i in (np.argsort(-rows[:, 1], kind="stable") if len(rows) else []):
        key = _pair_key(rows[i])
        if key not in seen:
            seen.add(key)
            out.append(int(i))
    return out


def _top_rows(rows: np.ndarray, top_k: int) -> np.ndarray:
    """Rows [N, 10] sorted by score (stable, descending), the first top_k."""
    if len(rows) == 0:
        return rows
    order = np.argsort(-rows[:, 1], kind="stable")
    return rows[order[:max(0, top_k)]]


def _rows_to_draw(rows: np.ndarray, top_k: int, attention_pair: int | None):
    """(the top_k rows + the attention pair's row when outside them, that row or None)."""
    top = _top_rows(rows, top_k)
    if attention_pair is None:
        return top, None
    if not 0 <= attention_pair < len(rows):
        raise ValueError(f"draw_interactions: attention_pair {attention_pair} out of range "
                         f"(0..{len(rows) - 1})")
    att_row = rows[attention_pair]
    if not any(np.array_equal(att_row[2:], r[2:]) for r in top):
        top = np.concatenate([top, att_row[None]], 0)
    return top, att_row


def _legend_lines(rows, top, rank, class_names, att_row, title, note) -> list:
    """The legend's text: the title, one "#pair verb object score" line per drawn row, the note."""
    lines = [title] if title else []
    marked = False
    for r in top:
        k = int(r[0])
        name = class_names[k] if 0 <= k < len(class_names) else f"class {k}"
        mark = ""
        if att_row is not None and not marked and np.array_equal(r[2:], att_row[2:]):
            mark, marked = "  [attention]", True  # on the pair's first line only
        lines.append(f"#{rank[_pair_key(r)]} {name} {r[1]:.2f}{mark}")
    if len(rows) == 0:
        lines.append(note or "no interaction predicted")
    elif note:
        lines.append(note)
    return lines


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------

class _Canvas:
    """Image-frame boxes -> canvas pixels (scaled by s, clipped to the displayed image)."""

    def __init__(self, s: int, cw: int, ch: int):
        self.s, self.cw, self.ch = s, cw, ch

    def box(self, b):
        x1, y1, x2, y2 = (float(v) * self.s for v in b)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        x1, x2 = min(max(round(x1), 0), self.cw - 1), min(max(round(x2), 0), self.cw - 1)
        y1, y2 = min(max(round(y1), 0), self.ch - 1), min(max(round(y2), 0), self.ch - 1)
        return x1, y1, x2, y2

    def centre(self, b):
        x1, y1, x2, y2 = self.box(b)
        return (x1 + x2) // 2, (y1 + y2) // 2


def _draw_pairs(draw: ImageDraw.ImageDraw, canvas: _Canvas, pairs: list, rank: dict, lw: int, tag_font):
    """Links first, then object boxes, then human boxes (on top), then the pair-number tags."""
    r_dot = max(2, lw)
    for key in pairs:
        (hx, hy), (ox, oy) = canvas.centre(key[0:4]), canvas.centre(key[4:8])
        draw.line([(hx, hy), (ox, oy)], fill=LINK_COLOUR, width=lw)
        for (x, y) in ((hx, hy), (ox, oy)):
            draw.ellipse([x - r_dot, y - r_dot, x + r_dot, y + r_dot], fill=LINK_COLOUR)
    humans = {key[0:4] for key in pairs}
    objects = {key[4:8] for key in pairs} - humans
    for b in objects:
        draw.rectangle(canvas.box(b), outline=OBJECT_COLOUR, width=lw)
    for b in humans:
        draw.rectangle(canvas.box(b), outline=HUMAN_COLOUR, width=lw)
    # pair numbers on the link midpoints: white on a black tag (never a box colour)
    for key in pairs:
        (hx, hy), (ox, oy) = canvas.centre(key[0:4]), canvas.centre(key[4:8])
        mx, my = (hx + ox) // 2, (hy + oy) // 2
        text = str(rank[key])
        left, top, right, bottom = draw.textbbox((mx, my), text, font=tag_font, anchor="mm")
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=TAG_BG)
        draw.text((mx, my), text, fill=TAG_FG, font=tag_font, anchor="mm")


def _draw_legend(draw: ImageDraw.ImageDraw, y: int, lines: list, colour_key: bool, fs: int, pad: int,
                 lw: int, font):
    """The legend strip from row y: one line of text each, then the human / object colour key."""
    for line in lines:
        draw.text((pad, y), line, fill=LEGEND_FG, font=font)
        y += fs + pad
    if colour_key:
        x = pad
        for colour, word in ((HUMAN_COLOUR, "human"), (OBJECT_COLOUR, "object")):
            draw.rectangle([x, y, x + fs, y + fs], outline=colour, width=lw)
            x += fs + pad
            draw.text((x, y), word, fill=LEGEND_FG, font=font)
            x += round(draw.textlength(word, font=font)) + 2 * pad


def draw_interactions(image: Image.Image, rows: np.ndarray, class_names: Sequence[str],
                      top_k: int = 5, attention: np.ndarray | None = None, *,
                      attention_pair: int | None = None, title: str | None = None,
                      note: str | None = None) -> Image.Image:
    """Draw the top interactions of one image.

    image:        PIL image in the frame of the boxes (any mode; converted to RGB).
    rows:         np.ndarray [N, 10] prediction rows [hoi, score, hx1, hy1, hx2, hy2, ox1, oy1,
                  ox2, oy2] in image pixels (any order; sorted here by score).
    class_names:  K names, class_names[hoi] = "verb object" (e.g. "ride bicycle").
    top_k:        how many triplets (rows) to show; their boxes and pairs are drawn.
    attention:    optional [Gh, Gw] map (e.g. box-guided attention of one pair, averaged over
                  heads) blended over the image.
    attention_pair: row index (into ``rows`` as given) of the pair the attention belongs to;
                  that pair is drawn (and named in the legend) even if outside the top_k.
    title, note:  optional extra legend lines (e.g. the file name, "no person detected").
    Returns a new RGB image: the image scaled by canvas_scale(w, h) plus a legend strip below.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 10) if np.size(rows) else np.zeros((0, 10))
    img = to_rgb(image)
    w, h = img.size
    s = canvas_scale(w, h)
    cw, ch = w * s, h * s
    disp = img.resize((cw, ch), Image.NEAREST) if s > 1 else img.copy()
    if attention is not None:
        disp = _overlay_attention(disp, attention)

    top, att_row = _rows_to_draw(rows, top_k, attention_pair)
    # pair number = rank of the pair over ALL rows by best score (infer's --attention n)
    rank = {_pair_key(rows[i]): n + 1 for n, i in enumerate(unique_pairs(rows))}
    pairs = list(dict.fromkeys(_pair_key(r) for r in top))  # in order of first appearance

    lw, fs = line_width(cw, ch), font_size(cw, ch)
    font, tag_font = _font(fs), _font(max(10, round(fs * 0.8)))
    lines = _legend_lines(rows, top, rank, class_names, att_row, title, note)
    pad = max(4, fs // 3)
    legend_h = pad + (len(lines) + (1 if pairs else 0)) * (fs + pad) + pad
    canvas = Image.new("RGB", (cw, ch + legend_h), LEGEND_BG)
    canvas.paste(disp, (0, 0))
    draw = ImageDraw.Draw(canvas)
    _draw_pairs(draw, _Canvas(s, cw, ch), pairs, rank, lw, tag_font)
    _draw_legend(draw, ch + pad, lines, bool(pairs), fs, pad, lw, font)
    canvas.info["link_scale"] = s
    canvas.info["link_legend_top"] = ch
    return canvas


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (slow to import, needed once
    per figure the training loop, the ablation or the pretraining writes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig, dpi: int) -> bytes:
    """A finished figure as PNG bytes (tight layout); the figure is closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(records: Sequence[dict]) -> bytes:
    """Training curves as PNG bytes: the losses per step (log scale) and the mAPs per evaluated
    epoch, from log.jsonl records ({"kind": "train", "step", "loss*"} / {"kind": "eval",
    "epoch", "full", "rare", ...})."""
    plt = _pyplot()
    tr = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({k for r in tr for k in r if k.startswith("loss")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in tr if k in r]
        ax[0].plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    ax[0].set(xlabel="step", yscale="log", title="losses")
    if keys:
        ax[0].legend(fontsize=7)
    for k in ("full", "rare", "non_rare", "unseen", "seen"):
        pts = [(r["epoch"], r[k]) for r in ev if r.get(k) is not None]
        if pts:
            ax[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    ax[1].set(xlabel="epoch", ylabel="mAP", title="evaluation")
    if ev:
        ax[1].legend(fontsize=7)
    return _png(fig, dpi=80)


def plot_ablation(panels: Sequence[tuple]) -> bytes:
    """The ablation's bar chart as PNG bytes: one panel per table, ``(title, keys, bars)`` with
    bars ``[(row name, {key: mean}, {key: std or None})]``; per row one bar per key (mean, error
    bar = the standard deviation over seeds; a missing mean draws no bar)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * max(len(panels), 1)), squeeze=False)
    for ax, (title, keys, bars) in zip(axes[:, 0], panels):
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            xs = [j + (i - (len(keys) - 1) / 2) * width for j, b in enumerate(bars) if b[1].get(key) is not None]
            ys = [b[1][key] for b in bars if b[1].get(key) is not None]
            es = [b[2].get(key) or 0.0 for b in bars if b[1].get(key) is not None]
            if ys:
                ax.bar(xs, ys, width, yerr=es, capsize=2, color=f"C{i}", label=key.replace("_", "-"))
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set(ylabel="mAP (%)", title=title)
        ax.legend(fontsize=7, ncol=len(keys))
    return _png(fig, dpi=80)


def plot_pretraining(curve: dict, title: str) -> bytes:
    """pretrain_vlm.py's curves as PNG bytes: the contrastive loss per step (and its running
    mean) and the held-out retrieval top-1 / top-5 and prompt mAP per epoch, from the
    manifest's "curve" ({"loss": [...], "heldout": [{"epoch", "top1", "top5", "class_map",
    "chance_top1"}, ...]})."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    loss = np.array(curve["loss"])
    w = max(1, len(loss) // 50)
    ax[0].plot(loss, lw=0.5, alpha=0.4, label="step")
    ax[0].plot(np.arange(w - 1, len(loss)), np.convolve(loss, np.ones(w) / w, "valid"), label=f"mean of {w}")
    ax[0].set(xlabel="step", ylabel="training loss", title=title)
    ax[0].legend()
    ep = [e["epoch"] for e in curve["heldout"]]
    for key in ("top1", "top5", "class_map"):
        ax[1].plot(ep, [e[key] for e in curve["heldout"]], marker="o", label=key)
    ax[1].axhline(curve["heldout"][-1]["chance_top1"], ls=":", c="grey", label="chance top1")
    ax[1].set(xlabel="epoch", ylabel="held-out", ylim=(0, 1), title="held-out retrieval / prompt mAP")
    ax[1].legend(fontsize=8)
    return _png(fig, dpi=90)
