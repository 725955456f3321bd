"""LINK inference: images (or a folder) + boxes -> predictions JSON and annotated pictures.

Inference CLI
-------------
    python infer.py IMAGE_OR_FOLDER --checkpoint CKPT
        (--detections FILE [--image-ids COCO.json] | --detector NAME --detector-weights PATH
         | --gt-anno ANNO.json)
        [--out DIR] [--attention N] [--force] [--batch-size 8] [--top-k 5]
        [--max-predictions N] [--box-thresh 0.2] [--nms 0.5] [--detector-thresh 0.05]
        [--ignore-exif] [--no-pictures] [--device auto] [--threads N] [--quiet]

Writes DIR/predictions.json (default DIR = runs/infer; written atomically) in the project's
prediction format {image key: [[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], ...]}
(rows sorted by score; every (pair, allowed class) with a positive score unless
--max-predictions), and one PNG per image (DIR/<key with .png suffix>) with the boxes, the
human-object links, the top --top-k triplets and, with --attention N, the box-guided attention
map of pair #N (pairs are numbered by their best score, #1 = the top pair, as in the picture).
The checkpoint alone rebuilds the model (model.LINK.from_checkpoint). Image keys: the file
name for a single image; the path relative to the folder ('/'-separated) for a folder, which
is searched recursively (hidden entries and the output folder are skipped). Nothing that
exists is overwritten without --force: the error names the first conflicting file.
Unreadable images are reported, skipped and summarised at the end; an image whose boxes hold
no person (or a lone person) gets an empty prediction list and a note.

Boxes: exactly one source.
  --detections FILE   the project's per-image JSON {"<key or file name>": {"boxes":
                      [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}} (labels in the
                      checkpoint's object label space, COCO-80 for HICO-DET; an image without
                      boxes needs an entry with empty lists; every input image must be in the
                      file), or a COCO results list [{"image_id", "category_id" (COCO id),
                      "bbox" [x, y, w, h], "score"}] whose ids come from --image-ids (a COCO
                      JSON with "images": [{"id", "file_name"}]) or else from the last number in
                      each file name (000000397133.jpg -> 397133). Read by data.load_detections.
  --detector NAME     a torchvision COCO detector (fasterrcnn_resnet50_fpn(_v2),
                      fasterrcnn_mobilenet_v3_large(_320)_fpn, retinanet_resnet50_fpn(_v2),
                      fcos_resnet50_fpn, maskrcnn_resnet50_fpn(_v2), ssd300_vgg16,
                      ssdlite320_mobilenet_v3_large) built with weights=None,
                      weights_backbone=None (nothing is downloaded) and loaded from
                      --detector-weights (a state_dict file, or a dict with a "model" entry as
                      torchvision's reference scripts save). Torchvision's own COCO weights are
                      plain state_dicts: download them once elsewhere (e.g. the URL in
                      torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.url)
                      and pass the file. Its COCO category ids are mapped to COCO-80, then to
                      the class space by name. --detector-thresh is the detector's own floor.
  --gt-anno FILE      ground-truth boxes of a HICO-DET-format annotation file (data.gt_detections),
                      used as they are (no NMS, no threshold, score 1.0).
Detector and file boxes then go through data.select_boxes (class-wise NMS --nms, threshold
--box-thresh, 3..15 humans and 3..15 objects; PROTOCOLS.md: 0.2, or 0.05 for strong detectors).

Frames: images are read with PIL and turned upright with their EXIF orientation
(ImageOps.exif_transpose), so boxes from a detection file or an annotation file must refer to
the image AS DISPLAYED (what viewers, cv2.imread and ImageOps.exif_transpose show); the
detector runs on that image and predictions are written in that frame. Boxes made on the image
as stored (e.g. read with plain PIL Image.open, which ignores EXIF): pass --ignore-exif. A note
is printed when file boxes overshoot the displayed image but fit the stored one. Any mode is
accepted (1, L, P, RGBA, CMYK, 16-bit I;16, I, F, ...; see to_rgb); the model and the pictures
see 8-bit RGB.

DETR / H-DETR (or any DETR-family detector) -> per-image detection JSON. Run the detector
yourself on each image as displayed and convert its raw outputs with convert_detr_outputs:

    import data, infer
    dets = {}
    for name, image in my_images:                       # PIL images, EXIF applied
        out = detr(transform(image)[None])              # pred_logits [1, Q, C], pred_boxes [1, Q, 4]
        d = infer.convert_detr_outputs(out["pred_logits"], out["pred_boxes"], [image.size],
                                       activation="softmax",   # DETR (last column = no-object)
                                       labels="coco91")        # class index = COCO category id
        dets[name] = d[0]
    data.save_detections("detections.json", dets)

  DETR (facebookresearch/detr): softmax over 92 columns, the last is "no object"; each query
  keeps its best class; boxes are normalised (cx, cy, w, h) -> activation="softmax".
  H-DETR / Deformable-DETR / DINO: sigmoid (focal) classification without a no-object
  column; keep the top 100 (query, class) pairs of the image -> activation="sigmoid", top=100.
  Labels: models trained on COCO use COCO category ids (1..90) -> labels="coco91". A model
  fine-tuned on HICO-DET with 80 object classes may already index COCO-80 (or another
  order): check against the annotation file's "objects" list, then pass labels="coco80" or
  remap yourself. Boxes are scaled by the (w, h) of the image you pass in sizes.
  Then: python infer.py images/ --checkpoint ck.pt --detections detections.json
  --box-thresh 0.05 (the peers' threshold for DETR-quality detections).

Python use: run(...) is the CLI as a function; draw_interactions(...) draws one image.

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
* The legend lists the top triplets: "#pair verb object score".
* An attention map [Gh, Gw] (any non-negative values) is min-max normalised, bilinearly
  resized to the displayed image and alpha-blended (red = high) under the boxes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HUMAN_COLOUR = (23, 190, 255)     # exact RGB of human box outlines
OBJECT_COLOUR = (255, 96, 17)     # exact RGB of object box outlines
LINK_COLOUR = (250, 232, 41)      # exact RGB of human-object links
TAG_BG = (0, 0, 0)
TAG_FG = (255, 255, 255)
LEGEND_BG = (24, 24, 24)
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


def _top_rows(rows: np.ndarray, top_k: int) -> np.ndarray:
    """Rows [N, 10] sorted by score (stable, descending), the first top_k."""
    if len(rows) == 0:
        return rows
    order = np.argsort(-rows[:, 1], kind="stable")
    return rows[order[:max(0, top_k)]]


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

    top = _top_rows(rows, top_k)
    att_row = None
    if attention_pair is not None:
        if not 0 <= attention_pair < len(rows):
            raise ValueError(f"draw_interactions: attention_pair {attention_pair} out of range "
                             f"(0..{len(rows) - 1})")
        att_row = rows[attention_pair]
        if not any(np.array_equal(att_row[2:], r[2:]) for r in top):
            top = np.concatenate([top, att_row[None]], 0)

    # pair number = rank of the pair (unique human box + object box) over ALL rows by best
    # score, so "#n" is the same number infer's --attention n refers to
    rank: dict = {}
    for r in _top_rows(rows, len(rows)):
        rank.setdefault(tuple(np.round(r[2:], 4)), len(rank) + 1)
    pairs: list[tuple] = []   # the pairs to draw, in order of first appearance in `top`
    for r in top:
        key = tuple(np.round(r[2:], 4))
        if key not in pairs:
            pairs.append(key)

    lw = line_width(cw, ch)
    fs = font_size(cw, ch)
    font = _font(fs)
    tag_font = _font(max(10, round(fs * 0.8)))
    lines = []
    marked = False
    if title:
        lines.append(title)
    for r in top:
        k = int(r[0])
        name = class_names[k] if 0 <= k < len(class_names) else f"class {k}"
        pid = rank[tuple(np.round(r[2:], 4))]
        mark = ""
        if att_row is not None and not marked and np.array_equal(r[2:], att_row[2:]):
            mark, marked = "  [attention]", True  # on the pair's first line only
        lines.append(f"#{pid} {name} {r[1]:.2f}{mark}")
    if len(rows) == 0:
        lines.append(note or "no interaction predicted")
    elif note:
        lines.append(note)

    pad = max(4, fs // 3)
    legend_h = pad + (len(lines) + (1 if pairs else 0)) * (fs + pad) + pad
    canvas = Image.new("RGB", (cw, ch + legend_h), LEGEND_BG)
    canvas.paste(disp, (0, 0))
    draw = ImageDraw.Draw(canvas)

    def cbox(b):  # image frame -> canvas frame, clipped to the displayed image
        x1, y1, x2, y2 = (float(v) * s for v in b)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        x1, x2 = min(max(round(x1), 0), cw - 1), min(max(round(x2), 0), cw - 1)
        y1, y2 = min(max(round(y1), 0), ch - 1), min(max(round(y2), 0), ch - 1)
        return x1, y1, x2, y2

    def centre(b):
        x1, y1, x2, y2 = cbox(b)
        return (x1 + x2) // 2, (y1 + y2) // 2

    # links first, then object boxes, then human boxes (on top)
    r_dot = max(2, lw)
    for key in pairs:
        hb, ob = key[0:4], key[4:8]
        (hx, hy), (ox, oy) = centre(hb), centre(ob)
        draw.line([(hx, hy), (ox, oy)], fill=LINK_COLOUR, width=lw)
        for (x, y) in ((hx, hy), (ox, oy)):
            draw.ellipse([x - r_dot, y - r_dot, x + r_dot, y + r_dot], fill=LINK_COLOUR)
    humans = {key[0:4] for key in pairs}
    objects = {key[4:8] for key in pairs} - humans
    for b in objects:
        draw.rectangle(cbox(b), outline=OBJECT_COLOUR, width=lw)
    for b in humans:
        draw.rectangle(cbox(b), outline=HUMAN_COLOUR, width=lw)
    # pair numbers on the link midpoints: white on a black tag (never a box colour)
    for key in pairs:
        (hx, hy), (ox, oy) = centre(key[0:4]), centre(key[4:8])
        mx, my = (hx + ox) // 2, (hy + oy) // 2
        text = str(rank[key])
        l, t, r_, b_ = draw.textbbox((mx, my), text, font=tag_font, anchor="mm")
        draw.rectangle([l - 2, t - 2, r_ + 2, b_ + 2], fill=TAG_BG)
        draw.text((mx, my), text, fill=TAG_FG, font=tag_font, anchor="mm")

    # legend strip below the image: one line per triplet, then a colour key
    y = ch + pad
    for line in lines:
        draw.text((pad, y), line, fill=(235, 235, 235), font=font)
        y += fs + pad
    if len(pairs):
        x = pad
        for colour, word in ((HUMAN_COLOUR, "human"), (OBJECT_COLOUR, "object")):
            draw.rectangle([x, y, x + fs, y + fs], outline=colour, width=lw)
            x += fs + pad
            draw.text((x, y), word, fill=(235, 235, 235), font=font)
            x += round(draw.textlength(word, font=font)) + 2 * pad
    canvas.info["link_scale"] = s
    canvas.info["link_legend_top"] = ch
    return canvas


# ==============================================================================================
# Inference CLI
# ==============================================================================================

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
              ".pbm", ".pnm"}
TORCHVISION_DETECTORS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
)


class InferError(ValueError):
    """Bad input to infer (file, image and field named in the message); the CLI exits with 2."""


class UnreadableImage(InferError):
    """An image file that PIL cannot decode: reported, skipped and summarised, never fatal."""


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def load_image(path, exif: bool = True):
    """Read an image file -> (RGB PIL image in the frame boxes refer to, stored (w, h)).

    exif=True: the EXIF orientation is applied (ImageOps.exif_transpose), so the image is the
    one viewers display; exif=False: the image as stored. Any mode is converted by to_rgb.
    Raises UnreadableImage for files PIL cannot decode (truncated, not an image, ...).
    """
    from PIL import ImageOps
    try:
        with Image.open(path) as im:
            im.load()
            stored = im.size
            if exif:
                im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
            if rgb is im:  # detach from the file handle
                rgb = im.copy()
        return rgb, stored
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise UnreadableImage(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def collect_images(path, exclude=None) -> list:
    """A file or a folder -> [(key, Path)], key = the name used in predictions / detections:
    the file name for a single image, the path relative to the folder (with '/') for a folder
    (sub-folders are searched; hidden files/folders and `exclude` (the output folder) are not).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such image or folder")
    if p.is_file():
        return [(p.name, p)]
    excl = Path(exclude).resolve() if exclude is not None else None
    items = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        if excl is not None and (excl == f.resolve().parent or excl in f.resolve().parents):
            continue
        items.append((rel.as_posix(), f))
    if not items:
        raise InferError(f"{p}: no image files in this folder (extensions {sorted(IMAGE_EXTS)})")
    return items


def picture_names(keys) -> dict:
    """key -> relative PNG path of its picture: the key with its suffix replaced by .png, or
    the key + '.png' when two inputs would collide (a.jpg and a.png)."""
    first = {k: str(Path(k).with_suffix(".png").as_posix()) for k in keys}
    counts: dict = {}
    for v in first.values():
        counts[v] = counts.get(v, 0) + 1
    return {k: (v if counts[v] == 1 else k + ".png") for k, v in first.items()}


# ---------------------------------------------------------------------------------------------
# class space helpers
# ---------------------------------------------------------------------------------------------

def _norm_name(s: str) -> str:
    return str(s).strip().lower().replace("_", " ")


def hoi_class_names(cs: dict) -> list:
    """'verb object' per class (e.g. 'ride bicycle'); the prompt where a class has no verb."""
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


def coco80_to_space(cs: dict) -> np.ndarray:
    """Long[80]: the class space's label of each COCO-80 object (-1 when it has none).

    Identity when the class space uses COCO-80 (HICO-DET, the synthetic world); otherwise
    matched by name (case, '_' vs ' ' ignored)."""
    import data as D
    idx = {_norm_name(n): i for i, n in enumerate(cs["object_names"])}
    return np.array([idx.get(_norm_name(n), -1) for n in D.COCO80_NAMES], dtype=np.int64)


def _remap_labels(dets: dict, table: np.ndarray) -> dict:
    """Map labels through table (COCO-80 -> class space), dropping boxes mapped to -1."""
    import torch
    lab = torch.as_tensor(dets["labels"]).long()
    new = torch.from_numpy(table)[lab.clamp(0, len(table) - 1)]
    keep = (lab >= 0) & (lab < len(table)) & (new >= 0)
    return {"boxes": dets["boxes"][keep], "scores": dets["scores"][keep], "labels": new[keep]}


# ---------------------------------------------------------------------------------------------
# box sources
# ---------------------------------------------------------------------------------------------

class FileBoxes:
    """Boxes from a detection file: the project's per-image JSON or a COCO results list.

    Per-image JSON keys are matched to the image's key (its path relative to the input folder)
    or, failing that, its file name. COCO results need image ids: from `image_ids_file` (a
    COCO-style JSON with "images": [{"id", "file_name"}]) or else the last run of digits of
    each file name (COCO's 000000397133.jpg -> 397133).
    """
    needs_images = False
    kind = "detection file"

    def __init__(self, path, cs: dict, keys, image_ids_file=None):
        import data as D
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: detection file not found")
        try:
            with open(self.path) as f:
                head = f.read(4096).lstrip()[:1]
        except OSError as e:
            raise InferError(f"{self.path}: cannot read detection file ({e})") from None
        table = None
        image_ids = None
        if head == "[":  # COCO results: COCO-91 ids -> COCO-80 -> class space
            image_ids = self._image_ids(keys, image_ids_file)
            table = coco80_to_space(cs)
        try:
            dets = D.load_detections(self.path, image_ids=image_ids,
                                     num_labels=None if table is not None else len(cs["object_names"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InferError(f"{e}") from None
        if table is not None:
            dets = {k: _remap_labels(v, table) for k, v in dets.items()}
        self.dets = {}
        missing = []
        for key in keys:
            hit = key if key in dets else (Path(key).name if Path(key).name in dets else None)
            if hit is None:
                missing.append(key)
            else:
                self.dets[key] = dets[hit]
        if missing:
            some = next(iter(dets), None)
            raise InferError(
                f"{self.path}: no entry for image {missing[0]!r} ({len(missing)} of {len(keys)} images "
                f"missing; the file has {len(dets)} images"
                + (f", e.g. {some!r}" if some is not None else "") + ")"
                + ("; an image without boxes needs an entry with empty lists" if head == "{" else ""))

    def _image_ids(self, keys, image_ids_file):
        import re
        if image_ids_file:
            p = Path(image_ids_file)
            try:
                doc = json.loads(p.read_text())
                imgs = doc["images"]
                by_name = {str(im["file_name"]): int(im["id"]) for im in imgs}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InferError(f"{p}: expected a COCO-style JSON with 'images': "
                                 f"[{{'id', 'file_name'}}] ({type(e).__name__}: {e})") from None
            ids = {}
            for key in keys:
                iid = by_name.get(key, by_name.get(Path(key).name))
                if iid is not None:
                    ids[iid] = key
            return ids
        ids = {}
        for key in keys:
            digits = re.findall(r"\d+", Path(key).stem)
            if not digits:
                raise InferError(f"{self.path}: COCO results need image ids; image {key!r} has no "
                                 f"number in its name (pass --image-ids COCO_JSON)")
            iid = int(digits[-1])
            if iid in ids:
                raise InferError(f"{self.path}: images {ids[iid]!r} and {key!r} both map to image_id "
                                 f"{iid} (pass --image-ids COCO_JSON)")
            ids[iid] = key
        return ids

    def get(self, keys, images):
        return [self.dets[k] for k in keys]


class GTBoxes:
    """Ground-truth boxes from a HICO-DET-format annotation file (data.gt_detections), used as
    they are: no NMS, no threshold (score 1.0 each). Object labels are mapped from the file's
    `objects` names to the class space when the two differ."""
    needs_images = False
    kind = "annotation file"

    def __init__(self, path, cs: dict, keys):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: annotation file not found")
        try:
            doc = json.loads(self.path.read_text())
            files, annos = doc["filenames"], doc["annotation"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InferError(f"{self.path}: not a HICO-DET-format annotation file "
                             f"(needs 'filenames' and 'annotation'; {type(e).__name__}: {e})") from None
        if len(files) != len(annos):
            raise InferError(f"{self.path}: {len(files)} filenames but {len(annos)} annotations")
        objects = doc.get("objects")
        self.table = None
        if objects is not None and [_norm_name(o) for o in objects] != [_norm_name(o) for o in cs["object_names"]]:
            idx = {_norm_name(n): i for i, n in enumerate(cs["object_names"])}
            self.table = np.array([idx.get(_norm_name(n), -1) for n in objects], dtype=np.int64)
        self.person = int(cs["person_label"])
        by_name = {str(f): i for i, f in enumerate(files)}
        self.sizes = doc.get("size")
        self.index, missing = {}, []
        for key in keys:
            i = by_name.get(key, by_name.get(Path(key).name))
            if i is None:
                missing.append(key)
            else:
                self.index[key] = i
        if missing:
            raise InferError(f"{self.path}: field 'filenames' has no image {missing[0]!r} "
                             f"({len(missing)} of {len(keys)} images missing)")
        self.annos = annos

    def get(self, keys, images):
        import data as D
        out = []
        for key in keys:
            a = self.annos[self.index[key]]
            try:
                dets = D.gt_detections({"boxes_h": a["boxes_h"], "boxes_o": a["boxes_o"],
                                        "object": a["object"]}, person_label=self.person)
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise InferError(f"{self.path}: image {key!r}: bad annotation ({type(e).__name__}: {e})") from None
            if self.table is not None:
                lab = dets["labels"].numpy()
                is_h = lab == self.person
                mapped = np.where(is_h, self.person, self.table[np.clip(lab, 0, len(self.table) - 1)])
                import torch
                keep = torch.from_numpy(mapped >= 0)
                dets = {"boxes": dets["boxes"][keep], "scores": dets["scores"][keep],
                        "labels": torch.from_numpy(mapped)[keep]}
            out.append(dets)
        return out

    def size_of(self, key):
        if self.sizes is None:
            return None
        s = self.sizes[self.index[key]]
        return (int(s[0]), int(s[1]))


def build_detector(name: str, weights, score_thresh: float = 0.05, device="cpu"):
    """A torchvision COCO detector built with weights=None, weights_backbone=None (no download),
    then loaded from a local state_dict file (a plain state_dict, or a dict with a 'model' entry
    as torchvision's reference training scripts save). Its labels are COCO category ids."""
    import torch
    import torchvision
    if name not in TORCHVISION_DETECTORS:
        raise InferError(f"--detector: unknown detector {name!r}; choose one of {', '.join(TORCHVISION_DETECTORS)}")
    if not weights:
        raise InferError(f"--detector {name} needs --detector-weights PATH (a local state_dict; "
                         f"nothing is downloaded)")
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: detector weights not found")
    det = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91)
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InferError(f"{weights}: cannot load detector weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise InferError(f"{weights}: expected a state_dict, got {type(sd).__name__}")
    try:
        det.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InferError(f"{weights}: state_dict does not fit {name} "
                         f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    for holder in (det, getattr(det, "roi_heads", None)):
        if holder is not None and hasattr(holder, "score_thresh"):
            holder.score_thresh = float(score_thresh)
    return det.eval().to(device)


class DetectorBoxes:
    """Boxes from a torchvision detector run on the images (as displayed, see --ignore-exif)."""
    needs_images = True
    kind = "detector"

    def __init__(self, name, weights, cs: dict, score_thresh=0.05, device="cpu"):
        import data as D
        self.det = build_detector(name, weights, score_thresh, device)
        self.device = device
        to80 = np.full(91, -1, dtype=np.int64)
        for i, cid in enumerate(D.COCO80_TO_COCO91):
            to80[cid] = i
        space = coco80_to_space(cs)
        self.table = np.where(to80 >= 0, space[np.clip(to80, 0, 79)], -1)          # [91]

    def get(self, keys, images):
        import torch
        x = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).to(self.device)
             for im in images]                                                         # [3, H, W] each
        with torch.no_grad():
            outs = self.det(x)
        res = []
        for o in outs:
            lab = o["labels"].cpu().long()
            new = torch.from_numpy(self.table)[lab.clamp(0, 90)]
            keep = (lab >= 0) & (lab <= 90) & (new >= 0)
            res.append({"boxes": o["boxes"].detach().cpu().float()[keep],
                        "scores": o["scores"].detach().cpu().float()[keep], "labels": new[keep]})
        return res


def convert_detr_outputs(logits, boxes, sizes, activation: str = "softmax", labels: str = "coco91",
                         top: int = 100) -> list:
    """DETR-family raw outputs -> per-image detections in the project's format (COCO-80 labels).

    logits: [B, Q, C] class logits; boxes: [B, Q, 4] normalised (cx, cy, w, h) in [0, 1];
    sizes: B (w, h) of the images AS DISPLAYED (what the boxes are wanted in).
    activation:
      "softmax" (DETR, last column = no-object): prob = softmax(logits)[..., :-1], each query
                keeps its best class;
      "sigmoid" (Deformable-DETR, H-DETR, DINO: focal loss, no no-object column):
                prob = sigmoid(logits), the `top` best (query, class) pairs of the image.
    labels: "coco91" when the class index is the COCO category id (DETR/H-DETR trained on COCO:
            91 ids, ids without a category dropped), "coco80" when it is already a 0..79 index.
    Returns a list of {"boxes" [N, 4] xyxy pixels, "scores" [N], "labels" [N] COCO-80}; write
    them with data.save_detections(path, {filename: dets}).
    """
    import torch
    import data as D
    logits, boxes = torch.as_tensor(logits).float(), torch.as_tensor(boxes).float()
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise InferError(f"convert_detr_outputs: logits [B, Q, C] and boxes [B, Q, 4] expected, got "
                         f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
    if len(sizes) != logits.shape[0]:
        raise InferError(f"convert_detr_outputs: {logits.shape[0]} images but {len(sizes)} sizes")
    to80 = {cid: i for i, cid in enumerate(D.COCO80_TO_COCO91)}
    out = []
    for b, (w, h) in enumerate(sizes):
        if activation == "softmax":
            prob = logits[b].softmax(-1)[:, :-1]                                    # [Q, C-1]
            scores, cls = prob.max(-1)                                             # [Q]
            q = torch.arange(len(cls))
        elif activation == "sigmoid":
            prob = logits[b].sigmoid()                                             # [Q, C]
            scores, flat = prob.flatten().topk(min(top, prob.numel()))
            q, cls = flat // prob.shape[1], flat % prob.shape[1]
        else:
            raise InferError(f"convert_detr_outputs: activation must be 'softmax' or 'sigmoid', got {activation!r}")
        cx, cy, bw, bh = boxes[b, q].unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        if labels == "coco91":
            lab = torch.tensor([to80.get(int(c), -1) for c in cls], dtype=torch.long)
        elif labels == "coco80":
            lab = torch.where(cls < 80, cls, torch.full_like(cls, -1)).long()
        else:
            raise InferError(f"convert_detr_outputs: labels must be 'coco91' or 'coco80', got {labels!r}")
        keep = lab >= 0
        order = torch.sort(-scores[keep], stable=True).indices
        out.append({"boxes": xyxy[keep][order], "scores": scores[keep][order], "labels": lab[keep][order]})
    return out


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def read_checkpoint_meta(checkpoint):
    """(config dict, class space dict) of a LINK checkpoint, without building the model.

    A checkpoint made with model.register_tiny_vlm's default tiny VLM ("link-tiny", not a stock
    open_clip name) gets it registered here, so that the checkpoint alone rebuilds the model."""
    import torch
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is impossible, read it whole
            ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a bad file
        raise InferError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or "class_space" not in ck or not isinstance(ck.get("config"), dict):
        raise InferError(f"{path}: checkpoint has no field 'config' / 'class_space' (not a LINK checkpoint)")
    vlm = ck["config"].get("vlm")
    if isinstance(vlm, str) and vlm.startswith("link-tiny"):
        import open_clip
        if vlm not in open_clip.list_models():
            if vlm != "link-tiny":
                raise InferError(f"{path}: field 'config.vlm' is {vlm!r}, a custom tiny VLM; register it "
                                 f"(model.register_tiny_vlm) before loading")
            import model as M
            M.register_tiny_vlm(vlm)
    cs = ck["class_space"]
    cs = dict(cs) if isinstance(cs, dict) else dict(vars(cs))
    for key in ("prompts", "object_names", "hoi_object", "hoi_verb", "verb_names", "person_label"):
        if key not in cs:
            raise InferError(f"{path}: field 'class_space' has no {key!r}")
    return dict(ck["config"]), cs


def load_model(checkpoint, device="cpu"):
    """LINK.from_checkpoint(checkpoint) -> (model in eval mode, class space dict)."""
    _, cs = read_checkpoint_meta(checkpoint)
    import model as M
    try:
        model = M.LINK.from_checkpoint(Path(checkpoint), map_location=device)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise InferError(f"{e}") from None
    return model.eval(), cs


def _num_pairs(dets, person_label: int) -> int:
    lab = np.asarray(dets["labels"]).reshape(-1)
    nh = int((lab == person_label).sum())
    return nh * (len(lab) - 1)


def pair_attention(model, captured, p: int, per_head: bool = False):
    """Box-guided attention of pair p in the LAST decoder layer, recomputed from that layer's
    inputs (captured by a forward pre-hook) and weights, as kernels.box_attention defines it:

        attn[h, t] = softmax_t(q[p, h] . k[img(p), h, t] * D**-0.5 + box_bias[p, h, t])

    with q = sp_q(query), k = sp_k(F^l) and box_bias = kernels.box_bias(pair boxes, strength)
    (spatial branch; without the linking decoder, the semantic branch's plain attention on F).
    Returns [Gh, Gw] averaged over heads (numpy), or [Hd, Gh, Gw] with per_head=True.
    """
    import torch
    from kernels import box_bias
    layer = model.decoder[-1]
    q, tokens, latent, pair_image, boxes, grid_hw = captured
    gh, gw = grid_hw
    Hd = model.cfg.heads
    b = int(pair_image[p])
    with torch.no_grad():
        if model.cfg.linking_decoder:
            qq, kv, wk, strength = layer.sp_q(q[p:p + 1]), latent[b], layer.sp_k, layer.strength
        else:
            qq, kv, wk, strength = layer.sem_q(q[p:p + 1]), tokens[b], layer.sem_k, layer.zero_strength
        W = qq.shape[1]
        dh = W // Hd
        k = wk(kv).view(kv.shape[0], Hd, dh).transpose(0, 1)                          # [Hd, T, dh]
        logits = torch.einsum("hd,htd->ht", qq.view(Hd, dh), k) * dh ** -0.5          # [Hd, T]
        logits = logits + box_bias(boxes[p:p + 1].float(), strength.float(), (gh, gw))[0].to(logits.dtype)
        attn = logits.float().softmax(-1).view(Hd, gh, gw)                            # [Hd, Gh, Gw]
    attn = attn.cpu().numpy()
    return attn if per_head else attn.mean(0)


def unique_pairs(rows: np.ndarray) -> list:
    """Row index (into rows) of the best row of each unique pair, pairs ranked by best score:
    element n - 1 is pair #n of the pictures."""
    seen, out = set(), []
    for i in (np.argsort(-rows[:, 1], kind="stable") if len(rows) else []):
        key = tuple(np.round(rows[i, 2:], 4))
        if key not in seen:
            seen.add(key)
            out.append(int(i))
    return out


def predict_batch(model, images, dets, person_label: int, attention_pair: int | None = None,
                  max_predictions: int | None = None):
    """One batch: RGB images (their own sizes) + selected detections -> (rows, attention, notes).

    rows: list of float64 [N, 10] (sorted by score); attention: list of [Gh, Gw] or None (for
    pair #attention_pair, 1-based as drawn); notes: list of str or None. Images without a
    human-other pair are not sent to the model (empty rows + a note)."""
    import torch
    n = len(images)
    rows = [np.zeros((0, 10))] * n
    att = [None] * n
    notes = [None] * n
    run = []
    for i, d in enumerate(dets):
        if _num_pairs(d, person_label) > 0:
            run.append(i)
            continue
        lab = np.asarray(d["labels"]).reshape(-1)
        nh = int((lab == person_label).sum())
        notes[i] = ("no box" if len(lab) == 0 else
                    f"no person among the {len(lab)} boxes" if nh == 0 else
                    "one person and no other box") + ": no pair, empty predictions"
    if not run:
        return rows, att, notes
    captured = {}
    hook = None
    if attention_pair is not None and len(model.decoder):
        hook = model.decoder[-1].register_forward_pre_hook(
            lambda mod, args: captured.__setitem__("args", args))
    try:
        with torch.no_grad():
            x = model.preprocess([images[i] for i in run])                             # [b, 3, S, S]
            feats = model.encode_images(x)                                             # [b, C, Gh, Gw]
            out = model(feats, [dets[i] for i in run], [images[i].size for i in run])
            preds = model.postprocess(out, [dets[i] for i in run], k=max_predictions)
    finally:
        if hook is not None:
            hook.remove()
    for j, i in enumerate(run):
        rows[i] = np.asarray(preds[j], dtype=np.float64).reshape(-1, 10)
        if attention_pair is None:
            continue
        if "args" not in captured:
            notes[i] = "the model has no decoder layer: no attention map"
            continue
        ranked = unique_pairs(rows[i])
        if not 1 <= attention_pair <= len(ranked):
            notes[i] = f"--attention {attention_pair}: the image has {len(ranked)} scored pairs"
            continue
        r = rows[i][ranked[attention_pair - 1]]
        sel = (out["pair_image"] == j).nonzero().squeeze(1)
        bh = out["boxes_h"][sel].double().cpu().numpy()
        bo = out["boxes_o"][sel].double().cpu().numpy()
        hit = np.nonzero((np.abs(bh - r[2:6]).max(1) < 1e-6) & (np.abs(bo - r[6:10]).max(1) < 1e-6))[0]
        if len(hit) == 0:  # cannot happen: postprocess copies these boxes
            notes[i] = f"--attention {attention_pair}: pair not found in the model output"
            continue
        att[i] = pair_attention(model, captured["args"], int(sel[hit[0]]))
    return rows, att, notes


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then os.replace onto path (same folder, so the replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rows_to_json(rows: np.ndarray) -> list:
    """[N, 10] -> [[hoi (int), score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], ...].

    The model computes in float32: each number is written as the shortest decimal that reads
    back as the same float32 (13.52, not 13.520000457763672), so boxes from a file come back
    as written there."""
    return [[int(r[0])] + [float(str(np.float32(v))) for v in r[1:]]
            for r in np.asarray(rows, dtype=np.float64).reshape(-1, 10)]


def check_outputs(out_dir: Path, pictures: dict, force: bool, draw: bool = True) -> list:
    """The files this run would write; raises InferError on the first existing one unless force."""
    planned = [out_dir / "predictions.json"] + ([out_dir / v for v in pictures.values()] if draw else [])
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise InferError(f"{existing[0]}: already exists ({len(existing)} of the {len(planned)} output "
                         f"files exist); pass --force to overwrite")
    return planned


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def run(inputs, checkpoint, out_dir="runs/infer", detections=None, image_ids=None, detector=None,
        detector_weights=None, gt_anno=None, attention=None, force=False, batch_size=8, top_k=5,
        max_predictions=None, box_thresh=0.2, nms=0.5, detector_thresh=0.05, exif=True,
        draw=True, device="cpu", progress=True, log=None) -> dict:
    """The CLI as a function. Returns a summary dict: predictions ({key: [N, 10] array}),
    notes ({key: str}), skipped ({key: reason}), pictures ({key: Path}), out (Path)."""
    import data as D
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    sources = sum(x is not None for x in (detections, detector, gt_anno))
    if sources != 1:
        raise InferError("choose exactly one box source: --detections FILE, --detector NAME "
                         "(--detector-weights PATH) or --gt-anno ANNO.json")
    if detector_weights is not None and detector is None:
        raise InferError("--detector-weights needs --detector NAME")
    if batch_size < 1 or top_k < 0 or (max_predictions is not None and max_predictions < 1):
        raise InferError(f"--batch-size and --max-predictions must be >= 1, --top-k >= 0 (got "
                         f"{batch_size}, {max_predictions}, {top_k})")
    if attention is not None and attention < 1:
        raise InferError(f"--attention is a 1-based pair number as drawn (#1 = the top pair), got {attention}")
    out_dir = Path(out_dir)
    items = collect_images(inputs, exclude=out_dir)
    keys = [k for k, _ in items]
    pictures = picture_names(keys)
    check_outputs(out_dir, pictures, force, draw)
    _, cs = read_checkpoint_meta(checkpoint)     # cheap: the inputs are checked before the model is built
    person = int(cs["person_label"])
    names = hoi_class_names(cs)
    if detections is not None:
        source = FileBoxes(detections, cs, keys, image_ids)
    elif gt_anno is not None:
        source = GTBoxes(gt_anno, cs, keys)
    else:
        source = DetectorBoxes(detector, detector_weights, cs, detector_thresh, device)
    model, _ = load_model(checkpoint, device)

    preds, notes, skipped, written = {}, {}, {}, {}
    bar = tqdm(total=len(items), desc="infer", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        ok_keys, imgs, stored = [], [], []
        for key, path in batch:
            try:
                im, st = load_image(path, exif)
            except UnreadableImage as e:
                skipped[key] = str(e)
                log(f"skipped: {e}")
                continue
            ok_keys.append(key)
            imgs.append(im)
            stored.append(st)
        if ok_keys:
            raw = source.get(ok_keys, imgs)
            sel = []
            for key, im, st, d in zip(ok_keys, imgs, stored, raw):
                if isinstance(source, GTBoxes):
                    s = d  # ground truth: every box, as it is
                    size = source.size_of(key)
                    if size is not None and size != im.size:
                        notes[key] = (f"{source.path} gives size {size} but the image is {im.size} "
                                      + ("(EXIF rotation? try --ignore-exif)" if size == st else ""))
                else:
                    s = D.select_boxes(d, person_label=person, nms=nms, score_thresh=box_thresh)
                    if not isinstance(source, DetectorBoxes):
                        warn = _frame_check(s, im.size, st, exif)
                        if warn:
                            notes[key] = warn
                sel.append(s)
            rows, att, bnotes = predict_batch(model, imgs, sel, person, attention if draw else None,
                                              max_predictions)
            for key, im, r, a, n in zip(ok_keys, imgs, rows, att, bnotes):
                preds[key] = r
                if n:
                    notes[key] = n if key not in notes else notes[key] + "; " + n
                if draw:
                    pic = draw_interactions(im, r, names, top_k=top_k, attention=a,
                                            attention_pair=(unique_pairs(r)[attention - 1] if a is not None else None),
                                            title=key, note=notes.get(key))
                    dst = out_dir / pictures[key]
                    _atomic_write(dst, lambda tmp, pic=pic: pic.save(tmp, format="PNG"))
                    written[key] = dst
        bar.update(len(batch))
    bar.close()

    if not preds:
        raise InferError(f"{inputs}: none of the {len(items)} images could be read "
                         f"(first: {next(iter(skipped.values()))})")
    pred_path = out_dir / "predictions.json"
    doc = {k: rows_to_json(preds[k]) for k in keys if k in preds}
    _atomic_write(pred_path, lambda tmp: Path(tmp).write_text(json.dumps(doc)))
    return dict(predictions=preds, notes=notes, skipped=skipped, pictures=written, out=out_dir,
                predictions_file=pred_path)


def _frame_check(dets, size, stored, exif: bool):
    """A note when boxes from a file overshoot the image but would fit its stored frame."""
    b = np.asarray(dets["boxes"]).reshape(-1, 4)
    if not len(b):
        return None
    w, h = size
    over = b[:, 2].max() > w * 1.02 + 2 or b[:, 3].max() > h * 1.02 + 2
    if not over:
        return None
    if exif and tuple(stored) != tuple(size):
        sw, sh = stored
        if b[:, 2].max() <= sw * 1.02 + 2 and b[:, 3].max() <= sh * 1.02 + 2:
            return ("boxes extend beyond the displayed image but fit the stored one: the detection "
                    "file may use the un-rotated frame (try --ignore-exif)")
    return f"boxes extend beyond the image ({w}x{h}); wrong detection file?"


def summarise(res: dict, n_total: int) -> str:
    preds, notes, skipped = res["predictions"], res["notes"], res["skipped"]
    n_empty = sum(1 for r in preds.values() if len(r) == 0)
    lines = [f"{len(preds)} of {n_total} images processed ({n_empty} with no prediction); "
             f"predictions: {res['predictions_file']}"
             + (f"; pictures in {res['out']}" if res["pictures"] else "")]
    for k, n in list(notes.items())[:20]:
        lines.append(f"  note: {k}: {n}")
    if len(notes) > 20:
        lines.append(f"  ... {len(notes) - 20} more notes")
    if skipped:
        lines.append(f"{len(skipped)} unreadable file(s) skipped:")
        for k, why in list(skipped.items())[:20]:
            lines.append(f"  {why}")
        if len(skipped) > 20:
            lines.append(f"  ... {len(skipped) - 20} more")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py", description="LINK inference: predictions JSON + one annotated PNG per image.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("Inference CLI\n-------------\n")[-1].split("Python use:")[0])
    p.add_argument("input", help="an image file or a folder (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="LINK checkpoint (rebuilds the model alone)")
    g = p.add_argument_group("boxes (exactly one source)")
    g.add_argument("--detections", help="per-image detection JSON or COCO results JSON")
    g.add_argument("--image-ids", help="COCO-style JSON ('images': [{id, file_name}]) for COCO results")
    g.add_argument("--detector", help=f"torchvision detector: {', '.join(TORCHVISION_DETECTORS)}")
    g.add_argument("--detector-weights", help="local state_dict of --detector")
    g.add_argument("--gt-anno", help="HICO-DET-format annotation file: its ground-truth boxes")
    p.add_argument("--out", default="runs/infer", help="output folder (default runs/infer)")
    p.add_argument("--attention", type=int, help="draw the box-guided attention of pair #N (1-based, as drawn)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5, help="triplets drawn per image (default 5)")
    p.add_argument("--max-predictions", type=int, help="keep only the top N rows per image in the JSON")
    p.add_argument("--box-thresh", type=float, default=0.2, help="select_boxes score threshold (0.2; 0.05 for strong detectors)")
    p.add_argument("--nms", type=float, default=0.5, help="select_boxes class-wise NMS IoU")
    p.add_argument("--detector-thresh", type=float, default=0.05, help="detector's own score threshold")
    p.add_argument("--ignore-exif", action="store_true", help="use images as stored (boxes in the stored frame)")
    p.add_argument("--no-pictures", action="store_true", help="write predictions.json only")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        res = run(args.input, args.checkpoint, out_dir=args.out, detections=args.detections,
                  image_ids=args.image_ids, detector=args.detector, detector_weights=args.detector_weights,
                  gt_anno=args.gt_anno, attention=args.attention, force=args.force,
                  batch_size=args.batch_size, top_k=args.top_k, max_predictions=args.max_predictions,
                  box_thresh=args.box_thresh, nms=args.nms, detector_thresh=args.detector_thresh,
                  exif=not args.ignore_exif, draw=not args.no_pictures, device=device,
                  progress=not args.quiet)
    except (InferError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_total = len(res["predictions"]) + len(res["skipped"])
    print(summarise(res, n_total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
