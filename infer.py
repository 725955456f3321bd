"""LINK inference: images (or a folder) + boxes -> predictions JSON and annotated pictures.

Inference CLI
-------------
    python infer.py IMAGE_OR_FOLDER --checkpoint CKPT
        (--detections FILE [--image-ids COCO.json] | --detector NAME --detector-weights PATH
         | --gt-anno ANNO.json)
        [--out DIR] [--attention N] [--force] [--batch-size 8] [--top-k 5]
        [--max-predictions N] [--box-thresh 0.2] [--nms 0.5] [--detector-thresh 0.05]
        [--ignore-exif] [--no-pictures] [--device auto] [--threads N] [--quiet]

Writes DIR/predictions.json (default runs/infer; rows [hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2]
per image key, sorted by score) and one PNG per image: the boxes, the human-object links, the top --top-k
triplets and, with --attention N, the box-guided attention map of pair #N. The checkpoint alone rebuilds the
model. Boxes come from exactly one source: a detection file (per-image JSON or COCO results), a torchvision
detector loaded from local weights (nothing is downloaded) or the ground truth of an annotation file. Images
are read as displayed (EXIF orientation applied; --ignore-exif for the stored frame). Nothing that exists is
overwritten without --force; an input is never an output. Formats, frames, detectors: docs/inference.md.

Python use: run(InferOptions(...)) is the CLI as a function; convert_detr_outputs turns DETR-family raw
outputs into detections; viz.draw_interactions draws one image.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

import data
import formats
from common import (
    NOW,
    OneLineParser,
    atomic_write,
    atomic_write_json,
    check_input_file,
    clean_stale_temps,
    file_kind,
    nonneg_int,
    note,
    positive_int,
    read_json,
    refuse_outputs_over_inputs,
    run_command,
    unit_float,
)
from formats import as_index
from model import LINK
from runs import BUILD_ERRORS, CheckpointError, CheckpointNotFound, build_error_reason, load_checkpoint
from trainer import nonfinite_cause, nonfinite_images
from viz import draw_interactions, hoi_class_names, to_rgb, unique_pairs

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
              ".pbm", ".pnm"}
#: image types not read: such a file is listed with the reason, not counted among the other files
OTHER_IMAGE_EXTS = {".jfif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".ico", ".psd", ".tga", ".dng"}
#: a folder's names that are no input by design: counted in the summary; every other one is listed
NOT_INPUTS = ("hidden", "other file (not an image name)", "in the output folder")
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


class NonFiniteScores(InferError):
    """The model scored images NaN / inf; ``positions`` in the batch, run() names the images."""

    def __init__(self, positions: list, cause: str):
        super().__init__(f"non-finite scores ({cause})")
        self.positions, self.cause = positions, cause


# --- images --------------------------------------------------------------------------------------
def load_image(path, exif: bool = True):
    """Read an image file -> (RGB PIL image in the frame boxes refer to, stored (w, h)): as displayed (EXIF
    orientation applied) or, exif=False, as stored; any mode via to_rgb. UnreadableImage if PIL cannot decode it."""
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


def collect_images(path, exclude=None, skipped=None) -> list:
    """A file or a folder -> [(key, Path)], key = the file name of a single image, else the '/'-separated path in
    the folder (searched recursively, links to folders not followed). Every other name goes to skipped {key: why}:
    one of NOT_INPUTS (hidden, other files, `exclude` = the output folder) or a reason (a broken link, a FIFO ...)."""
    p, skipped = Path(path), {} if skipped is None else skipped
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such image or folder")
    if not p.is_dir():
        check_input_file(p, "image", InferError)
        return [(p.name, p)]
    excl = Path(exclude).resolve() if exclude is not None else None
    if excl is not None and (excl == p.resolve() or excl in p.resolve().parents):
        excl = None             # the output folder holds the input folder: skip nothing
    items = _walk(p, "", excl, skipped)
    if not items:
        first = next((f"; {k!r}: {w}" for k, w in skipped.items() if w not in NOT_INPUTS), "")
        raise InferError(f"{p}: no image files in this folder (extensions {sorted(IMAGE_EXTS)}){first}")
    return items


def _walk(folder: Path, prefix: str, excl, skipped: dict) -> list:
    """collect_images' depth-first walk (names in sorted order) -> [(key, Path)]."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        skipped[prefix.rstrip("/") or "."] = f"cannot list this folder ({e.strerror})"
        return []
    items = []
    for e in entries:
        key, f, ext = prefix + e.name, Path(e.path), Path(e.name).suffix.lower()
        if e.name.startswith(".") or (e.is_dir(follow_symlinks=False) and excl is not None and f.resolve() == excl):
            skipped[key] = NOT_INPUTS[0 if e.name.startswith(".") else 2]
        elif e.is_dir(follow_symlinks=False):
            if ext in IMAGE_EXTS:
                skipped[key] = "a folder, not an image file (searched for images as any folder)"
            items += _walk(f, key + "/", excl, skipped)
        elif f.is_dir():                 # DirEntry.is_dir raises on a link loop
            skipped[key] = "a link to a folder (links to folders are not followed)"
        elif ext not in IMAGE_EXTS:
            skipped[key] = f"{ext} images are not read" if ext in OTHER_IMAGE_EXTS else NOT_INPUTS[1]
        elif why := _not_an_image(f, excl):
            skipped[key] = why
        else:
            items.append((key, f))
    return items


def _not_an_image(f: Path, excl) -> str | None:
    """Why the entry f with an image name is no input; None: it is one."""
    try:
        kind, size = file_kind((st := f.stat()).st_mode), st.st_size
    except OSError as e:
        return f"a broken link to {os.readlink(f)} ({e.strerror})" if f.is_symlink() else f"cannot stat it ({e})"
    if kind != "regular file" or not size:
        return "an empty file" if kind == "regular file" else f"a {kind}, not a regular file"
    return NOT_INPUTS[2] if excl is not None and excl in f.resolve().parents else None


def picture_names(keys) -> dict:
    """key -> relative PNG path of its picture: the key with its suffix replaced by .png, or
    the key + '.png' when two inputs would collide (a.jpg and a.png)."""
    first = {k: str(Path(k).with_suffix(".png").as_posix()) for k in keys}
    counts = Counter(first.values())
    return {k: (v if counts[v] == 1 else k + ".png") for k, v in first.items()}


# --- class space helpers -------------------------------------------------------------------------
def _norm_name(s: str) -> str:
    return str(s).strip().lower().replace("_", " ")


def names_to_space(names, cs: dict) -> np.ndarray:
    """Long[len(names)]: the class space's label of each object name, matched by name (case, '_' vs ' '
    ignored; -1 when it has none)."""
    idx = {_norm_name(n): i for i, n in enumerate(cs["object_names"])}
    return np.array([idx.get(_norm_name(n), -1) for n in names], dtype=np.int64)


def coco80_to_space(cs: dict) -> np.ndarray:
    """Long[80]: the class space's label of each COCO-80 object (identity for HICO-DET, the synthetic world)."""
    return names_to_space(data.COCO80_NAMES, cs)


def _lookup(table: dict, key: str):
    """table's entry for an image key (its path in the input folder), else for its file name; None if neither."""
    return table.get(key, table.get(Path(key).name))


def _remap_labels(dets: dict, table: np.ndarray) -> dict:
    """Map labels through table (COCO-80 or COCO-91 -> class space), dropping boxes mapped to -1."""
    lab = torch.as_tensor(dets["labels"]).long()
    new = torch.from_numpy(table)[lab.clamp(0, len(table) - 1)]
    keep = (lab >= 0) & (lab < len(table)) & (new >= 0)
    return {"boxes": dets["boxes"][keep], "scores": dets["scores"][keep], "labels": new[keep]}


# --- box sources ---------------------------------------------------------------------------------
class FileBoxes:
    """Boxes from a detection file: the project's per-image JSON (keys: the image's key or file name) or a COCO
    results list, whose image ids come from `image_ids_file` or the last number of each file name."""

    def __init__(self, path, cs: dict, keys, image_ids_file=None):
        self.path = Path(path)
        check_input_file(self.path, "detection file", InferError)
        try:
            with open(self.path) as f:
                head = f.read(4096).lstrip()[:1]
        except OSError as e:
            raise InferError(f"{self.path}: cannot read detection file ({e})") from None
        table = image_ids = None
        if head == "[":  # COCO results: COCO-91 ids -> COCO-80 -> class space
            image_ids = self._image_ids(keys, image_ids_file)
            table = coco80_to_space(cs)
        try:
            dets = data.load_detections(self.path, image_ids=image_ids,
                                     num_labels=None if table is not None else len(cs["object_names"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InferError(f"{e}") from None
        if table is not None:
            dets = {k: _remap_labels(v, table) for k, v in dets.items()}
        self.dets = {key: _lookup(dets, key) for key in keys}
        missing = [key for key, d in self.dets.items() if d is None]
        if missing:
            some = next(iter(dets), None)
            raise InferError(
                f"{self.path}: no entry for image {missing[0]!r} ({len(missing)} of {len(keys)} images "
                f"missing; the file has {len(dets)} images"
                + (f", e.g. {some!r}" if some is not None else "") + ")"
                + ("; an image without boxes needs an entry with empty lists" if head == "{" else ""))

    def _image_ids(self, keys, image_ids_file):
        if image_ids_file:
            p = Path(image_ids_file)
            doc = read_json(p, "image-ids file", InferError)
            try:
                by_name = {im["file_name"]: as_index(im["id"]) for im in doc["images"]
                           if isinstance(im["file_name"], str)}
            except (ValueError, KeyError, TypeError) as e:
                raise InferError(f"{p}: expected a COCO-style JSON with 'images': "
                                 f"[{{'id': integer, 'file_name': string}}] ({type(e).__name__}: {e})") from None
            return {iid: key for key in keys if (iid := _lookup(by_name, key)) is not None}
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

    def __init__(self, path, cs: dict, keys):
        self.path = Path(path)
        doc = read_json(self.path, "annotation file", InferError)
        try:
            files, annos = doc["filenames"], doc["annotation"]
        except (KeyError, TypeError) as e:
            raise InferError(f"{self.path}: not a HICO-DET-format annotation file "
                             f"(needs 'filenames' and 'annotation'; {type(e).__name__}: {e})") from None
        if not isinstance(files, list) or not isinstance(annos, list) or len(files) != len(annos):
            raise InferError(f"{self.path}: fields 'filenames' and 'annotation' must be lists of the same length")
        objects = doc.get("objects")
        if objects is not None and not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
            raise InferError(f"{self.path}: field 'objects' must be a list of names")
        self.table = None
        if objects is not None and [_norm_name(o) for o in objects] != [_norm_name(o) for o in cs["object_names"]]:
            self.table = names_to_space(objects, cs)
        self.person, self.num_objects = int(cs["person_label"]), len(cs["object_names"])
        by_name = {str(f): i for i, f in enumerate(files)}
        self.sizes = doc.get("size")
        self.index = {key: _lookup(by_name, key) for key in keys}
        missing = [key for key, i in self.index.items() if i is None]
        if missing:
            raise InferError(f"{self.path}: field 'filenames' has no image {missing[0]!r} "
                             f"({len(missing)} of {len(keys)} images missing)")
        self.annos = annos

    def get(self, keys, images):
        out = []
        for key in keys:
            a = self.annos[self.index[key]]
            try:         # validated as the dataset validates it: boxes finite and ordered, labels in range
                for k in ("boxes_h", "boxes_o", "object"):
                    if not isinstance(a, dict) or k not in a:
                        raise formats.fail(self.path, "missing key", key, field_=k)
                bh, bo = (formats.boxes_array(a[k], self.path, key, k) for k in ("boxes_h", "boxes_o"))
                if len(bo) != len(bh):
                    raise formats.fail(self.path, f"{len(bo)} object boxes for {len(bh)} human boxes", key,
                                       field_="boxes_o")
                n_obj = len(self.table) if self.table is not None else self.num_objects
                obj = formats.int_array(a["object"], len(bh), 0, n_obj, self.path, key, "object")
                dets = data.gt_detections({"boxes_h": bh, "boxes_o": bo, "object": obj}, person_label=self.person)
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise InferError(f"{self.path}: image {key!r}: bad annotation ({e})" if not
                                 str(e).startswith(str(self.path)) else str(e)) from None
            if self.table is not None:
                lab = dets["labels"].numpy()
                is_h = lab == self.person
                mapped = np.where(is_h, self.person, self.table[np.clip(lab, 0, len(self.table) - 1)])
                keep = torch.from_numpy(mapped >= 0)
                dets = {"boxes": dets["boxes"][keep], "scores": dets["scores"][keep],
                        "labels": torch.from_numpy(mapped)[keep]}
            out.append(dets)
        return out

    def size_of(self, key):
        if self.sizes is None:
            return None
        if not isinstance(self.sizes, list) or len(self.sizes) != len(self.annos):
            raise InferError(f"{self.path}: field 'size': expected one [w, h] per image")
        try:
            return formats.image_size(self.sizes[self.index[key]], self.path, key)
        except ValueError as e:
            raise InferError(str(e)) from None


def build_detector(name: str, weights, score_thresh: float = 0.05, device="cpu"):
    """A torchvision COCO detector built with weights=None, weights_backbone=None (no download),
    then loaded from a local state_dict file (a plain state_dict, or a dict with a 'model' entry
    as torchvision's reference training scripts save). Its labels are COCO category ids."""
    if name not in TORCHVISION_DETECTORS:
        raise InferError(f"--detector: unknown detector {name!r}; choose one of {', '.join(TORCHVISION_DETECTORS)}")
    if not weights:
        raise InferError(f"--detector {name} needs --detector-weights PATH (a local state_dict; "
                         f"nothing is downloaded)")
    weights = Path(weights)
    check_input_file(weights, "detector weights", InferError)
    det = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91)
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InferError(f"{weights}: cannot load detector weights ({build_error_reason(e)})") from None
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

    def __init__(self, name, weights, cs: dict, score_thresh=0.05, device="cpu"):
        self.det = build_detector(name, weights, score_thresh, device)
        self.device = device
        to80 = np.full(91, -1, dtype=np.int64)
        to80[list(data.COCO80_TO_COCO91)] = np.arange(80)
        space = coco80_to_space(cs)
        self.table = np.where(to80 >= 0, space[np.clip(to80, 0, 79)], -1)          # [91]

    def get(self, keys, images):
        x = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).to(self.device)
             for im in images]                                                         # [3, H, W] each
        with torch.no_grad():
            outs = self.det(x)
        return [_remap_labels({"boxes": o["boxes"].detach().cpu().float(), "scores": o["scores"].detach().cpu().float(),
                               "labels": o["labels"].cpu()}, self.table) for o in outs]


def convert_detr_outputs(logits, boxes, sizes, activation: str = "softmax", labels: str = "coco91",
                         top: int = 100) -> list:
    """DETR-family raw outputs -> per-image detections in the project's format (docs/inference.md).

    logits: [B, Q, C]; boxes: [B, Q, 4] normalised (cx, cy, w, h); sizes: B (w, h) of the images AS DISPLAYED.
    activation "softmax" (DETR, last column = no-object: each query keeps its best class) or "sigmoid"
    (Deformable-DETR, H-DETR, DINO: the `top` best (query, class) pairs). labels "coco91" (the class index is
    the COCO category id) or "coco80" (already 0..79). Returns [{"boxes" [N, 4] xyxy pixels, "scores" [N],
    "labels" [N] COCO-80}], for data.save_detections(path, {filename: dets}).
    """
    logits, boxes = torch.as_tensor(logits).float(), torch.as_tensor(boxes).float()
    if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise InferError(f"convert_detr_outputs: logits [B, Q, C] and boxes [B, Q, 4] expected, got "
                         f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
    if len(sizes) != logits.shape[0]:
        raise InferError(f"convert_detr_outputs: {logits.shape[0]} images but {len(sizes)} sizes")
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
            lab = torch.tensor([formats.COCO91_TO_COCO80.get(int(c), -1) for c in cls], dtype=torch.long)
        elif labels == "coco80":
            lab = torch.where(cls < 80, cls, torch.full_like(cls, -1)).long()
        else:
            raise InferError(f"convert_detr_outputs: labels must be 'coco91' or 'coco80', got {labels!r}")
        keep = lab >= 0
        order = torch.sort(-scores[keep], stable=True).indices
        out.append({"boxes": xyxy[keep][order], "scores": scores[keep][order], "labels": lab[keep][order]})
    return out


# --- model ---------------------------------------------------------------------------------------
def read_checkpoint_meta(checkpoint):
    """(config dict, class space dict) of a LINK checkpoint, without building the model. A custom tiny VLM that
    open_clip does not know and the checkpoint does not carry (LINKConfig.vlm_config) is refused here."""
    path = Path(checkpoint)
    try:
        ck = load_checkpoint(path, mmap=True)      # runs.py's reader; memory-mapped: the settings only
    except CheckpointNotFound:
        raise
    except CheckpointError as e:
        raise InferError(str(e)) from None
    if not isinstance(ck["config"], dict):
        raise InferError(f"{path}: checkpoint field 'config' is not a dict (not a LINK checkpoint)")
    vlm = ck["config"].get("vlm")
    if isinstance(vlm, str) and vlm.startswith("link-tiny") and vlm != "link-tiny" \
            and not ck["config"].get("vlm_config") and vlm not in open_clip.list_models():
        raise InferError(f"{path}: field 'config.vlm' is {vlm!r}, a custom tiny VLM; register it "
                         f"(vlm.register_tiny_vlm) before loading")
    cs = ck["class_space"]
    cs = dict(cs) if isinstance(cs, dict) else dict(vars(cs))
    for key in ("prompts", "object_names", "hoi_object", "hoi_verb", "verb_names", "person_label"):
        if key not in cs:
            raise InferError(f"{path}: field 'class_space' has no {key!r}")
    try:                          # an inconsistent class space: refused here, not mid-drawing
        data.ClassSpace.from_dict(cs)
    except (ValueError, TypeError, IndexError) as e:
        raise InferError(f"{path}: field 'class_space': {build_error_reason(e)}") from None
    return dict(ck["config"]), cs


def load_model(checkpoint, device="cpu"):
    """LINK.from_checkpoint(checkpoint) -> (model in eval mode, class space dict)."""
    _, cs = read_checkpoint_meta(checkpoint)
    try:
        model = LINK.from_checkpoint(load_checkpoint(checkpoint), device=device)
    except FileNotFoundError:
        raise
    except BUILD_ERRORS as e:        # one line naming the checkpoint, not torch's paragraphs
        raise InferError(f"{checkpoint}: {build_error_reason(e)}") from None
    return model.eval(), cs


def pair_attention(model, captured, p: int, per_head: bool = False):
    """Box-guided attention of pair p in the LAST decoder layer (LinkingLayer.attention_map), from that layer's
    inputs captured by a forward pre-hook -> [Gh, Gw] averaged over heads (numpy), or [Hd, Gh, Gw] (per_head)."""
    attn = model.decoder[-1].attention_map(*captured, pair=p).cpu().numpy()          # [Hd, Gh, Gw]
    return attn if per_head else attn.mean(0)


def predict_batch(model, images, dets, person_label: int, attention_pair: int | None = None,
                  max_predictions: int | None = None, names: list | None = None):
    """One batch: RGB images (their own sizes) + selected detections -> (rows, attention, notes): float64
    [N, 10] sorted by score; [Gh, Gw] of pair #attention_pair (1-based, as drawn) or None; str or None.
    Images without a human-other pair are not sent to the model (empty rows + a note)."""
    n = len(images)
    rows, att, notes, run = [np.zeros((0, 10))] * n, [None] * n, [None] * n, []
    for i, d in enumerate(dets):
        lab = np.asarray(d["labels"]).reshape(-1)
        nh = int((lab == person_label).sum())
        if nh * (len(lab) - 1) > 0:       # a human and another box: at least one pair
            run.append(i)
            continue
        notes[i] = ("no box" if len(lab) == 0 else
                    f"no person among the {len(lab)} boxes" if nh == 0 else
                    "one person and no other box") + ": no pair, empty predictions"
    if not run:
        return rows, att, notes
    captured, hook = {}, None
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
    bad = nonfinite_images(out, [np.asarray(r, dtype=np.float64).reshape(-1, 10) for r in preds])
    if bad:          # a NaN score fails "score > 0": never an empty prediction list instead
        names = names or [f"image {i}" for i in range(n)]
        raise NonFiniteScores([run[b] for b in bad], nonfinite_cause(model, feats, [names[i] for i in run]))
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


# --- writing -------------------------------------------------------------------------------------
def rows_to_json(rows: np.ndarray) -> list:
    """[N, 10] -> [[hoi (int), score, hx1, ..., oy2], ...], each number the shortest decimal that reads back as
    the same float32 (13.52, not 13.520000457763672): boxes from a file come back as written there."""
    return [[int(r[0])] + [float(str(np.float32(v))) for v in r[1:]]
            for r in np.asarray(rows, dtype=np.float64).reshape(-1, 10)]


def check_outputs(out_dir: Path, pictures: dict, force: bool, draw: bool = True, inputs=()) -> None:
    """InferError when a file this run would write is an input (inputs: (label, path) pairs; never, not even
    with force) or already exists (unless force)."""
    planned = [("the predictions file", out_dir / "predictions.json")]
    if draw:
        planned += [(f"the picture of {k!r}", out_dir / v) for k, v in pictures.items()]
    refuse_outputs_over_inputs(planned, inputs, InferError)
    existing = [p for _, p in planned if p.exists()]
    if existing and not force:
        raise InferError(f"{existing[0]}: already exists ({len(existing)} of the {len(planned)} output "
                         f"files exist); pass --force to overwrite")


# --- the run -------------------------------------------------------------------------------------
@dataclass
class InferOptions:
    """Everything one run needs: the CLI's options (infer.py --help) as a dataclass."""
    inputs: str                         # an image file or a folder (searched recursively)
    checkpoint: str                     # LINK checkpoint (rebuilds the model alone)
    out_dir: str = "runs/infer"
    detections: str | None = None       # box sources: exactly one of detections, detector, gt_anno
    image_ids: str | None = None        # COCO-style JSON giving the image ids of COCO results
    detector: str | None = None
    detector_weights: str | None = None
    gt_anno: str | None = None
    attention: int | None = None        # draw the box-guided attention of pair #attention
    force: bool = False                 # overwrite existing outputs
    batch_size: int = 8
    top_k: int = 5                      # triplets drawn per image
    max_predictions: int | None = None  # keep only the top N rows per image
    box_thresh: float = 0.2             # select_boxes score threshold
    nms: float = 0.5                    # select_boxes class-wise NMS IoU
    detector_thresh: float = 0.05       # the detector's own score floor
    exif: bool = True                   # apply the EXIF orientation (False: --ignore-exif)
    draw: bool = True                   # write the pictures (False: --no-pictures)
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        """InferError for a bad combination of options (before any file is read)."""
        if sum(x is not None for x in (self.detections, self.detector, self.gt_anno)) != 1:
            raise InferError("choose exactly one box source: --detections FILE, --detector NAME "
                             "(--detector-weights PATH) or --gt-anno ANNO.json")
        if self.detector_weights is not None and self.detector is None:
            raise InferError("--detector-weights needs --detector NAME")
        if self.batch_size < 1 or self.top_k < 0 or (self.max_predictions is not None and self.max_predictions < 1):
            raise InferError(f"--batch-size and --max-predictions must be >= 1, --top-k >= 0 (got "
                             f"{self.batch_size}, {self.max_predictions}, {self.top_k})")
        if self.attention is not None and self.attention < 1:
            raise InferError(f"--attention is a 1-based pair number as drawn (#1 = the top pair), "
                             f"got {self.attention}")


def box_source(opts: InferOptions, cs: dict, keys: list):
    """The one box source the options name: FileBoxes, GTBoxes or DetectorBoxes."""
    if opts.detections is not None:
        return FileBoxes(opts.detections, cs, keys, opts.image_ids)
    if opts.gt_anno is not None:
        return GTBoxes(opts.gt_anno, cs, keys)
    return DetectorBoxes(opts.detector, opts.detector_weights, cs, opts.detector_thresh, opts.device)


def _read_batch(batch: list, exif: bool, skipped: dict, log) -> tuple[list, list, list]:
    """[(key, path)] -> (keys, RGB images, stored sizes) of the readable ones; the others go to
    skipped {key: reason} and the log."""
    ok = []
    for key, path in batch:
        try:
            ok.append((key, *load_image(path, exif)))
        except UnreadableImage as e:
            skipped[key] = str(e).removeprefix(f"{path}: ")
            log(f"skipped: {e}")
    return tuple(map(list, zip(*ok))) if ok else ([], [], [])


def _batch_boxes(source, keys: list, images: list, stored: list, opts: InferOptions, person: int,
                 notes: dict) -> list:
    """The boxes the model gets for each image: ground truth as it is, detections through
    data.select_boxes; frame mismatches go to notes {key: str}."""
    selected = []
    for key, im, st, d in zip(keys, images, stored, source.get(keys, images)):
        if isinstance(source, GTBoxes):
            s = d  # ground truth: every box, as it is
            size = source.size_of(key)
            if size is not None and size != im.size:
                notes[key] = (f"{source.path} gives size {size} but the image is {im.size} "
                              + ("(EXIF rotation? try --ignore-exif)" if size == st else ""))
        else:
            s = data.select_boxes(d, person_label=person, nms=opts.nms, score_thresh=opts.box_thresh)
            if not isinstance(source, DetectorBoxes) and (warn := _frame_check(s, im.size, st, opts.exif)):
                notes[key] = warn
        selected.append(s)
    return selected


def run(opts: InferOptions, log=None) -> dict:
    """The CLI as a function. Returns a summary dict: predictions ({key: [N, 10] array}),
    notes ({key: str}), skipped ({key: reason}), pictures ({key: Path}), out (Path),
    predictions_file (Path)."""
    log = log or note            # held until the run succeeds when the CLI holds notes
    opts.check()
    out_dir = Path(opts.out_dir)
    skipped = {}                 # every name not processed -> why (collect_images, then _read_batch)
    items = collect_images(opts.inputs, out_dir, skipped)
    keys = [k for k, _ in items]
    pictures = picture_names(keys)
    inputs = [("input image", f) for _, f in items] + [
        (f"--{k.replace('_', '-')}", getattr(opts, k)) for k in
        ("checkpoint", "detections", "image_ids", "detector_weights", "gt_anno") if getattr(opts, k)]
    check_outputs(out_dir, pictures, opts.force, opts.draw, inputs)
    clean_stale_temps(out_dir)        # what a run killed mid-write left (an interrupted one removes its own)
    _, cs = read_checkpoint_meta(opts.checkpoint)   # cheap: the inputs are checked before the model is built
    person, names = int(cs["person_label"]), hoi_class_names(cs)
    source = box_source(opts, cs, keys)
    model, _ = load_model(opts.checkpoint, opts.device)

    preds, notes, written = {}, {}, {}
    # no bar when stderr is not a terminal (None): a log file or a caller reading errors gets lines
    bar = tqdm(total=len(items), desc="infer", unit="img", disable=None if opts.progress else True,
               file=sys.stderr)
    for start in range(0, len(items), opts.batch_size):
        NOW.update(doing=f"inferring (image {start + 1} of {len(items)}) into {out_dir}", resume="re-run the command"
                   + (" with --force (pictures were written)" if written and not opts.force else ""))
        batch = items[start:start + opts.batch_size]
        ok_keys, imgs, stored = _read_batch(batch, opts.exif, skipped, log)
        if ok_keys:
            sel = _batch_boxes(source, ok_keys, imgs, stored, opts, person, notes)
            try:
                rows, att, bnotes = predict_batch(model, imgs, sel, person, opts.attention if opts.draw else None,
                                                  opts.max_predictions, ok_keys)
            except NonFiniteScores as e:
                names = ", ".join(repr(ok_keys[b]) for b in e.positions)
                raise InferError(f"{opts.checkpoint}: non-finite scores for image(s) {names} ({e.cause})") from None
            for key, im, r, a, n in zip(ok_keys, imgs, rows, att, bnotes):
                preds[key] = r
                if n:
                    notes[key] = n if key not in notes else notes[key] + "; " + n
                if opts.draw:
                    pic = draw_interactions(im, r, names, top_k=opts.top_k, attention=a,
                                            attention_pair=(unique_pairs(r)[opts.attention - 1]
                                                            if a is not None else None),
                                            title=key, note=notes.get(key))
                    written[key] = out_dir / pictures[key]
                    atomic_write(written[key], lambda f, pic=pic: pic.save(f, format="PNG"))
        bar.update(len(batch))
    bar.close()

    if not preds:
        raise InferError(f"{opts.inputs}: none of the {len(items)} images could be read "
                         f"(first: {items[0][1]}: {skipped[items[0][0]]})")
    pred_path = out_dir / "predictions.json"
    atomic_write_json(pred_path, {k: rows_to_json(preds[k]) for k in keys if k in preds})
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


def summarise(res: dict) -> str:
    """The CLI's report: counts, notes, every name not processed with its reason (NOT_INPUTS counted)."""
    preds, notes, skipped = res["predictions"], res["notes"], res["skipped"]
    n_empty = sum(1 for r in preds.values() if len(r) == 0)
    listed = {k: w for k, w in skipped.items() if w not in NOT_INPUTS}
    design = Counter(w for w in skipped.values() if w in NOT_INPUTS)
    lines = [f"{len(preds)} of {len(preds) + len(listed)} images processed ({n_empty} with no prediction); "
             f"predictions: {res['predictions_file']}"
             + (f"; pictures in {res['out']}" if res["pictures"] else "")]
    for k, n in list(notes.items())[:20]:
        lines.append(f"  note: {k}: {n}")
    if len(notes) > 20:
        lines.append(f"  ... {len(notes) - 20} more notes")
    if listed:
        lines += [f"{len(listed)} not processed:"] + [f"  {k}: {w}" for k, w in listed.items()]
    if design:
        lines.append("not inputs, by design: " + ", ".join(f"{n} {w}" for w, n in design.items()))
    return "\n".join(lines)


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="infer.py", description="LINK inference: predictions JSON + one annotated PNG per image.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("Inference CLI\n-------------\n")[-1].split("Python use:")[0])
    p.add_argument("input", help="an image file or a folder (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="LINK checkpoint (rebuilds the model alone)")
    g = p.add_argument_group("boxes (exactly one source)")
    g.add_argument("--detections", help="per-image detection JSON or COCO results JSON")
    g.add_argument("--image-ids", help="COCO-style JSON ('images': [{id, file_name}]) for COCO results")
    g.add_argument("--detector", choices=TORCHVISION_DETECTORS, metavar="NAME",
                   help=f"torchvision detector: {', '.join(TORCHVISION_DETECTORS)}")
    g.add_argument("--detector-weights", help="local state_dict of --detector")
    g.add_argument("--gt-anno", help="HICO-DET-format annotation file: its ground-truth boxes")
    p.add_argument("--out", default="runs/infer", help="output folder (default runs/infer)")
    p.add_argument("--attention", type=positive_int,
                   help="draw the box-guided attention of pair #N (1-based, as drawn)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--top-k", type=nonneg_int, default=5, help="triplets drawn per image (default 5)")
    p.add_argument("--max-predictions", type=positive_int, help="keep only the top N rows per image in the JSON")
    p.add_argument("--box-thresh", type=unit_float, default=0.2,
                   help="select_boxes score threshold (0.2; 0.05 for strong detectors)")
    p.add_argument("--nms", type=unit_float, default=0.5, help="select_boxes class-wise NMS IoU")
    p.add_argument("--detector-thresh", type=unit_float, default=0.05, help="detector's own score threshold")
    p.add_argument("--ignore-exif", action="store_true", help="use images as stored (boxes in the stored frame)")
    p.add_argument("--no-pictures", action="store_true", help="write predictions.json only")
    p.add_argument("--device", default="auto", type=_device,
                   help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """The command line (common.run_command): bad input, a file that cannot be read or written -> one line, 2."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _cli(args), [((InferError, ValueError, OSError), 2)], doing="loading the inputs")


def _cli(args) -> int:
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    same = {k: v for k, v in vars(args).items() if k in InferOptions.__dataclass_fields__}  # option = field
    res = run(InferOptions(args.input, out_dir=args.out, exif=not args.ignore_exif, draw=not args.no_pictures,
                           progress=not args.quiet, **same))
    print(summarise(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
