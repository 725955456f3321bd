"""One validated reader per input file format; torch-free (numpy only).

- HICO-DET-format annotation (fredzzhang/hicodet JSON, the synthetic world): ``parse_hico_anno``
- prediction rows ``{file_name: [[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], ...]}``:
  ``prediction_rows``, ``load_predictions``
- SWiG-HOI annotation and its meta tables: ``parse_swig_gt``, ``swig_meta_tables``, ``load_swig_meta``
- V-COCO VSRL + COCO instances: ``parse_vcoco_gt``; vsrl_eval detections: ``load_vcoco_dets``
- detection files: per image ``{file_name: {boxes, scores, labels}}`` (``image_detections``) and
  COCO results ``[{image_id, category_id, bbox, score}]`` (``coco_result``)
- the value checks every reader shares (``as_index``, ``as_box``, ...) and the protocols' IoU of
  each box frame (``iou_inclusive``: HICO-DET's +1, ``iou_continuous``: plain)

Every problem raises :class:`FormatError` (a ValueError; ``eval.FormatError`` and
``data.DataError`` are this type) with one line of the shape
``FILE: image 'NAME' row R: field: problem`` (parts that do not apply are left out).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional, Sequence

import numpy as np

from common import data_root, read_json


class FormatError(ValueError):
    """Bad input file; the one-line message names the file, the image, the row and the field."""


class FormatFileNotFoundError(FormatError, FileNotFoundError):
    """An input file does not exist."""


def where(file, image=None, row=None, field_=None) -> str:
    """``FILE: image 'NAME' row R: field`` (the parts given)."""
    out = str(file)
    if image is not None:
        out += f": image {str(image)!r}"
    if row is not None:
        out += f"{'' if image is not None else ':'} row {row}"
    return out + (f": {field_}" if field_ is not None else "")


def fail(file, problem, image=None, row=None, field_=None) -> FormatError:
    """The error ``FILE: image 'NAME' row R: field: problem``."""
    return FormatError(f"{where(file, image, row, field_)}: {problem}")


def read(path, what: str = "file") -> Any:
    """Parse a JSON file (common.read_json) -> object; FormatError naming the file on any problem."""
    return read_json(path, what, error=FormatError, missing=FormatFileNotFoundError)


# ---------------------------------------------------------------------------------------
# Values: the checks every reader shares (ValueError with a one-line reason; the caller adds
# the file, the image and the field)
# ---------------------------------------------------------------------------------------
FLOAT32_MAX = 3.4028234663852886e38


def is_number(v) -> bool:
    """int or float, never a bool (JSON true is not 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def as_index(v, n: Optional[int] = None, lo: int = 0) -> int:
    """An index: an integer (or a float with an integral value) in [lo, n). Never a bool, a
    fraction, NaN, or out of range: a negative index never wraps around to another entry."""
    if not is_number(v) or not math.isfinite(v) or v != int(v):
        raise ValueError(f"{v!r} is not an integer index")
    i = int(v)
    if i < lo or (n is not None and i >= n) or abs(i) >= 2 ** 62:
        raise ValueError(f"index {i} out of range [{lo}, {'' if n is None else n})")
    return i


def as_index_list(v, n: Optional[int] = None, lo: int = 0, unique: bool = False) -> list:
    """A list of indices (as_index each); ``unique``: no index twice."""
    if not isinstance(v, list):
        raise ValueError(f"expected a list of integer indices, got {type(v).__name__}")
    out = []
    for r, x in enumerate(v):
        try:
            out.append(as_index(x, n, lo))
        except ValueError as e:
            raise ValueError(f"entry {r}: {e}") from None
    if unique and len(set(out)) != len(out):
        dup = next(x for i, x in enumerate(out) if x in out[:i])
        raise ValueError(f"index {dup} listed twice")
    return out


def as_box(v) -> list:
    """[x1, y1, x2, y2]: 4 finite numbers within float32's range, x2 >= x1 and y2 >= y1."""
    if not (isinstance(v, (list, tuple)) and len(v) == 4 and all(is_number(x) for x in v)):
        raise ValueError(f"expected a box [x1, y1, x2, y2] of 4 numbers, got {v!r}")
    if not all(math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in v):
        raise ValueError(f"box {list(v)} has a non-finite value or one beyond float32's range")
    if v[2] < v[0] or v[3] < v[1]:
        raise ValueError(f"box {list(v)} has x2 < x1 or y2 < y1")
    return [float(x) for x in v]


def first_duplicate(items) -> Optional[Any]:
    """The first item seen twice in ``items`` (None when all differ)."""
    seen = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def swig_meta_tables(meta) -> tuple[list, list, list]:
    """SWiG-HOI's swig_v1_meta.json, validated -> (category names, action names, interactions
    [{id, action_id, object_id, frequency, evaluation}] with int fields). Ids index their table
    (no gaps, no duplicates), every (action_id, object_id) pair once, frequency in {0, 1, 2},
    evaluation in {0, 1}. ValueError names the field."""
    if not isinstance(meta, dict):
        raise ValueError("expected an object with SWIG_CATEGORIES, SWIG_ACTIONS, SWIG_INTERACTIONS")
    tables = []
    for key in ("SWIG_CATEGORIES", "SWIG_ACTIONS"):
        t = meta.get(key)
        if not isinstance(t, list) or not t:
            raise ValueError(f"field '{key}': expected a non-empty list of {{id, name}}")
        names = []
        for r, x in enumerate(t):
            if not (isinstance(x, dict) and isinstance(x.get("name"), str)) or \
                    (x.get("id") is not None and x.get("id") != r):
                raise ValueError(f"field '{key}[{r}]': expected {{id: {r}, name: string}}")
            names.append(x["name"])
        tables.append(names)
    inter = meta.get("SWIG_INTERACTIONS")
    if not isinstance(inter, list) or not inter:
        raise ValueError("field 'SWIG_INTERACTIONS': expected a non-empty list")
    out, keys = [], set()
    for r, x in enumerate(inter):
        try:
            if not isinstance(x, dict):
                raise ValueError("expected an object")
            e = {"id": as_index(x.get("id"), len(inter)),
                 "action_id": as_index(x.get("action_id"), len(tables[1])),
                 "object_id": as_index(x.get("object_id"), len(tables[0])),
                 "frequency": as_index(x.get("frequency"), 3), "evaluation": as_index(x.get("evaluation", 0), 2)}
        except ValueError as err:
            raise ValueError(f"field 'SWIG_INTERACTIONS[{r}]': {err}") from None
        if e["id"] != r or (e["action_id"], e["object_id"]) in keys:
            raise ValueError(f"field 'SWIG_INTERACTIONS[{r}]': id must be {r} and each (action_id, "
                             f"object_id) listed once")
        keys.add((e["action_id"], e["object_id"]))
        out.append(e)
    return tables[0], tables[1], out


# ---------------------------------------------------------------------------------------
# Box overlap of the two box frames (common.BOX_FRAMES)
# ---------------------------------------------------------------------------------------

def iou_inclusive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU with the inclusive +1 convention of the MATLAB toolkit.

    a, b: float64[n, 4] ``[x1, y1, x2, y2]`` -> float64[n]; 0 unless iw > 0 and ih > 0.
    Same operation order as VOCevaldet_bboxpair.m (bit-identical results).
    """
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = iw * ih
    ua = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1) + \
         (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1) - inter
    ok = (iw > 0) & (ih > 0)
    out = np.zeros(a.shape[0])
    np.divide(inter, ua, out=out, where=ok)
    return out


def iou_continuous(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise plain IoU (no +1) of the THID SWiG evaluator.

    a, b: float64[n, 4] -> float64[n]; widths/heights and the intersection are clamped at 0,
    IoU = 0 when the intersection is <= 0, else inter / (area_a + area_b - inter).
    """
    wa = np.maximum(a[:, 2] - a[:, 0], 0.0)
    ha = np.maximum(a[:, 3] - a[:, 1], 0.0)
    wb = np.maximum(b[:, 2] - b[:, 0], 0.0)
    hb = np.maximum(b[:, 3] - b[:, 1], 0.0)
    xi = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0)
    yi = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0)
    inter = xi * yi
    den = wa * ha + wb * hb - inter
    out = np.zeros(a.shape[0])
    np.divide(inter, den, out=out, where=inter > 0)
    return out


# ---------------------------------------------------------------------------------------
# HICO-DET-format annotation file and prediction rows
# ---------------------------------------------------------------------------------------

#: the columns of a prediction row
ROW_FIELDS = ("hoi", "score", "hx1", "hy1", "hx2", "hy2", "ox1", "oy1", "ox2", "oy2")


@dataclass
class HicoGT:
    """Parsed HICO-DET-format annotation (fredzzhang/hicodet JSON or the synthetic world)."""
    name: str
    filenames: list
    index: dict                     # filename -> image index
    num_classes: int
    obj_of_class: np.ndarray        # int64[K] object index of each class
    gt_class: np.ndarray            # int64[M]
    gt_image: np.ndarray            # int64[M]
    gt_boxes: np.ndarray            # float64[M, 8]
    rare: list | None
    non_rare: list | None
    zero_shot: dict | None
    num_empty: int = 0


def _anno_err(name, msg):
    return FormatError(f"{name}: {msg}")


def parse_hico_anno(anno: dict, name: str = "<anno>") -> HicoGT:
    """Validate a HICO-DET annotation dict and extract the GT arrays.

    Required keys: ``annotation`` (per image ``boxes_h``, ``boxes_o``, ``hoi``), ``filenames``,
    ``correspondence`` ([hoi, object, verb] per class; K = its length).  Optional: ``rare``,
    ``non_rare``, ``zero_shot``, ``empty``.
    """
    fns, annos, corr = _hico_header(anno, name)
    K = corr.shape[0]
    index = {}
    for i, f in enumerate(fns):
        if f in index:
            raise _anno_err(name, f"image '{f}': duplicate file name in 'filenames'")
        index[f] = i
    gt_class, gt_image, gt_boxes = _hico_pairs(annos, fns, K, name)
    rare, non_rare = _class_list(anno, "rare", K, name), _class_list(anno, "non_rare", K, name)
    if rare and non_rare and set(rare) & set(non_rare):
        raise _anno_err(name, f"class {min(set(rare) & set(non_rare))} is in both 'rare' and 'non_rare'")
    empty = _class_list(anno, "empty", len(fns), name, "image indices") or []
    zs = anno.get("zero_shot")
    if zs is not None and not isinstance(zs, dict):
        raise _anno_err(name, "field 'zero_shot' must be an object {split: [hoi, ...]}")
    return HicoGT(name=name, filenames=fns, index=index, num_classes=K,
                  obj_of_class=corr[:, 1].copy(), gt_class=gt_class, gt_image=gt_image,
                  gt_boxes=gt_boxes, rare=rare, non_rare=non_rare,
                  zero_shot=zs, num_empty=len(empty))


def _hico_header(anno: Any, name: str) -> tuple[list, list, np.ndarray]:
    """The file's top level -> (filenames, annotation entries, correspondence int64[K, >= 2])."""
    if not isinstance(anno, dict):
        raise _anno_err(name, "annotation file must be a JSON object (fredzzhang/hicodet format)")
    for key in ("annotation", "filenames", "correspondence"):
        if key not in anno:
            raise _anno_err(name, f"missing key '{key}'")
    fns, annos, corr = anno["filenames"], anno["annotation"], anno["correspondence"]
    if not isinstance(fns, list) or not all(isinstance(f, str) for f in fns):
        raise _anno_err(name, "field 'filenames' must be a list of strings")
    if not isinstance(annos, list) or len(annos) != len(fns):
        raise _anno_err(name, f"field 'annotation' must be a list with one entry per filename "
                              f"({len(fns)})")
    if not isinstance(corr, list) or not corr:
        raise _anno_err(name, "field 'correspondence' must be a non-empty list of [hoi, object, verb]")
    K = len(corr)
    corr_a = np.full((K, 3), -1, dtype=np.int64)           # row k: class k's [k, object, verb]
    for r, c in enumerate(corr):
        try:
            if not isinstance(c, list) or len(c) not in (2, 3):
                raise ValueError("expected [hoi, object, verb]")
            row = [as_index(c[0], K)] + [as_index(x) for x in c[1:]]
        except ValueError as e:
            raise _anno_err(name, f"field 'correspondence[{r}]': {e}") from None
        if corr_a[row[0], 0] >= 0:
            raise _anno_err(name, f"field 'correspondence[{r}]': class {row[0]} listed twice")
        corr_a[row[0], :len(row)] = row
    return fns, annos, corr_a


def _hico_pairs(annos: list, fns: list, K: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GT pairs of all images -> (class int64[M], image int64[M], boxes float64[M, 8]).

    Fast path: one conversion of every image's lists; _diagnose_hico_pairs finds the first
    malformed value only when that conversion fails."""
    cls_l, img_l, bh_l, bo_l = [], [], [], []
    for i, a in enumerate(annos):
        if not isinstance(a, dict):
            raise _anno_err(name, f"image '{fns[i]}': annotation entry must be an object")
        for key in ("boxes_h", "boxes_o", "hoi"):
            if key not in a or not isinstance(a[key], list):
                raise _anno_err(name, f"image '{fns[i]}': missing or malformed field '{key}'")
        n = len(a["hoi"])
        if len(a["boxes_h"]) != n or len(a["boxes_o"]) != n:
            raise _anno_err(name, f"image '{fns[i]}': fields 'boxes_h', 'boxes_o' and 'hoi' "
                                  f"have different lengths")
        if n:
            cls_l.append(a["hoi"])
            img_l.append(n)
            bh_l.append(a["boxes_h"])
            bo_l.append(a["boxes_o"])
    m = sum(img_l)
    gt_image = np.repeat(np.array([i for i, a in enumerate(annos) if len(a["hoi"])], dtype=np.int64),
                         img_l) if m else np.zeros(0, np.int64)
    try:
        gt_class = np.array(list(chain.from_iterable(cls_l)), dtype=np.float64).reshape(-1)
        bh = np.array(list(chain.from_iterable(bh_l)), dtype=np.float64).reshape(m, 4)
        bo = np.array(list(chain.from_iterable(bo_l)), dtype=np.float64).reshape(m, 4)
    except (ValueError, TypeError):
        _diagnose_hico_pairs(annos, fns, name)
        raise _anno_err(name, "malformed 'annotation'") from None
    checks = [
        (~np.isfinite(gt_class) | (gt_class != np.floor(gt_class)) | (gt_class < 0) | (gt_class >= K),
         f"field 'hoi' out of range [0, {K}) or not an integer"),
        (~np.isfinite(bh).all(1), "field 'boxes_h' has a NaN/inf coordinate"),
        (~np.isfinite(bo).all(1), "field 'boxes_o' has a NaN/inf coordinate"),
        ((bh[:, 2] < bh[:, 0]) | (bh[:, 3] < bh[:, 1]), "field 'boxes_h': x2 < x1 or y2 < y1"),
        ((bo[:, 2] < bo[:, 0]) | (bo[:, 3] < bo[:, 1]), "field 'boxes_o': x2 < x1 or y2 < y1"),
    ]
    for bad, msg in checks:          # the annotation is checked like the predictions
        if bad.any():
            j = int(np.argmax(bad))
            i = int(gt_image[j])
            r = j - int(np.searchsorted(gt_image, i))
            raise _anno_err(name, f"image '{fns[i]}' pair {r}: {msg}")
    return gt_class.astype(np.int64), gt_image, np.concatenate([bh, bo], axis=1)


def _diagnose_hico_pairs(annos: list, fns: list, name: str) -> None:
    """Slow path: raise on the first box that is not [x1, y1, x2, y2] or hoi that is not a number."""
    for i, a in enumerate(annos):
        for key in ("boxes_h", "boxes_o"):
            for r, b in enumerate(a[key]):
                if not (isinstance(b, list) and len(b) == 4 and all(is_number(v) for v in b)):
                    raise _anno_err(name, f"image '{fns[i]}' pair {r}: field '{key}' must be "
                                          f"[x1, y1, x2, y2]")
        for r, h in enumerate(a["hoi"]):
            if not is_number(h):
                raise _anno_err(name, f"image '{fns[i]}' pair {r}: field 'hoi' must be an integer")


def _class_list(anno: dict, key: str, K: int, name: str, what: str = "class indices") -> list | None:
    """The optional list of indices anno[key] (rare, non_rare: classes; empty: images), each in
    [0, K) once; None when absent."""
    if key not in anno or anno[key] is None:
        return None
    try:
        return as_index_list(anno[key], K, unique=True)
    except ValueError as e:
        raise _anno_err(name, f"field '{key}' must be a list of {what} in [0, {K}), each once ({e})") from None


def _row_error(src, filenames, img, offsets, j, msg):
    i = int(img[j])
    return FormatError(f"{src}: image '{filenames[i]}' row {j - int(offsets[i])}: {msg}")


def _validate_rows(rows: np.ndarray, img: np.ndarray, filenames: Sequence[str],
                   num_classes: int, src: str) -> None:
    """Vectorised value checks of prediction rows float64[N, 10] (img: int64[N], grouped)."""
    if rows.shape[0] == 0:
        return
    hoi, score = rows[:, 0], rows[:, 1]
    # fast path: everything fine (a few passes); the detailed checks only run on failure
    if (np.isfinite(rows).all() and ((hoi >= 0) & (hoi < num_classes) & (hoi == np.floor(hoi))).all()
            and (rows[:, 4:6] >= rows[:, 2:4]).all() and (rows[:, 8:10] >= rows[:, 6:8]).all()):
        return
    checks = [
        (~np.isfinite(hoi), lambda j: "hoi index is not a finite number"),
        (np.isfinite(hoi) & (hoi != np.floor(hoi)), lambda j: f"hoi index {float(rows[j, 0])!r} is not an integer"),
        ((hoi < 0) | (hoi >= num_classes),
         lambda j: f"hoi index {rows[j, 0]:g} out of range [0, {num_classes})"),
        (~np.isfinite(score), lambda j: f"score is {float(rows[j, 1])!r}"),
        (~np.isfinite(rows[:, 2:6]).all(1), lambda j: "human box has a NaN/inf coordinate"),
        (~np.isfinite(rows[:, 6:10]).all(1), lambda j: "object box has a NaN/inf coordinate"),
        (rows[:, 4] < rows[:, 2], lambda j: "x2 < x1 in human box"),
        (rows[:, 5] < rows[:, 3], lambda j: "y2 < y1 in human box"),
        (rows[:, 8] < rows[:, 6], lambda j: "x2 < x1 in object box"),
        (rows[:, 9] < rows[:, 7], lambda j: "y2 < y1 in object box"),
    ]
    bad = np.zeros(rows.shape[0], dtype=bool)
    for m, _ in checks:
        bad |= m
    if not bad.any():
        return
    j = int(np.argmax(bad))
    # offsets: first row of each image (rows are grouped by image, in any image order)
    offsets = np.zeros(len(filenames), dtype=np.int64)
    first = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    offsets[img[first]] = first
    for m, msg in checks:
        if m[j]:
            raise _row_error(src, filenames, img, offsets, j, msg(j))


def _diagnose_rows(src: str, name: str, rows: Any) -> None:
    """Slow path: find the first structurally malformed row of one image and raise."""
    if not isinstance(rows, list):
        raise FormatError(f"{src}: image '{name}': expected a list of rows "
                             f"[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], "
                             f"got {type(rows).__name__}")
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise FormatError(f"{src}: image '{name}' row {r}: expected a list of 10 numbers, "
                                 f"got {type(row).__name__}")
        if len(row) != 10:
            raise FormatError(f"{src}: image '{name}' row {r}: expected 10 values "
                                 f"[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], "
                                 f"got {len(row)}")
        for c, v in enumerate(row):
            if not is_number(v):
                raise FormatError(f"{src}: image '{name}' row {r}: field '{ROW_FIELDS[c]}' is "
                                     f"not a number ({v!r})")


def prediction_rows(obj: Any, filenames: Sequence[str], index: dict, num_classes: int,
                          src: str) -> tuple[np.ndarray, np.ndarray]:
    """{filename: rows} (lists or arrays) -> (rows float64[N, 10], img int64[N]), validated.

    Rows keep the object's image order (file order for a JSON file), then row order.
    """
    if not isinstance(obj, dict):
        raise FormatError(f"{src}: expected a JSON object {{file_name: [[hoi, score, hx1, hy1, "
                             f"hx2, hy2, ox1, oy1, ox2, oy2], ...]}}, got {type(obj).__name__}")
    names = list(obj.keys())
    img_idx = np.empty(len(names), dtype=np.int64)
    for k, nm in enumerate(names):
        i = index.get(nm)
        if i is None:
            raise FormatError(f"{src}: image '{nm}': unknown image name (not in the annotation file)")
        img_idx[k] = i
    vals = list(obj.values())
    if any(isinstance(v, np.ndarray) or hasattr(v, "__array__") for v in vals):  # arrays/tensors
        rows, counts = _rows_from_arrays(names, vals, src)
    else:
        rows, counts = _rows_from_lists(names, vals, src)
    img = np.repeat(img_idx, counts)
    _validate_rows(rows, img, filenames, num_classes, src)
    return rows, img


def _rows_from_arrays(names: list, vals: list, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image arrays / tensors [n, 10] -> (rows float64[N, 10], rows per image int64[images])."""
    counts = np.empty(len(vals), dtype=np.int64)
    parts = []
    for k, v in enumerate(vals):
        try:
            a = np.asarray(v, dtype=np.float64)
        except (ValueError, TypeError):
            _diagnose_rows(src, names[k], v if isinstance(v, list) else list(v))
            raise FormatError(f"{src}: image '{names[k]}': malformed rows") from None
        if a.size == 0:
            a = a.reshape(0, 10)
        if a.ndim != 2 or a.shape[1] != 10:
            raise FormatError(f"{src}: image '{names[k]}': expected an array [N, 10] of rows "
                                 f"[hoi, score, hx1, ..., oy2], got shape {tuple(a.shape)}")
        counts[k] = a.shape[0]
        parts.append(a)
    return (np.concatenate(parts, axis=0) if parts else np.zeros((0, 10))), counts


def _rows_from_lists(names: list, vals: list, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image lists of rows (parsed JSON) -> (rows float64[N, 10], rows per image).
    Fast path: one conversion of all rows; _diagnose_rows runs only when it fails."""
    counts = np.empty(len(vals), dtype=np.int64)
    for k, v in enumerate(vals):
        if not isinstance(v, list):
            _diagnose_rows(src, names[k], v)
        counts[k] = len(v)
    if not counts.sum():
        return np.zeros((0, 10)), counts
    try:
        with np.errstate(all="ignore"):
            rows = np.array(list(chain.from_iterable(vals)))
    except (ValueError, TypeError):
        rows = None
    if rows is None or rows.ndim != 2 or rows.shape[1] != 10 or rows.dtype.kind not in "iuf":
        for k, v in enumerate(vals):
            _diagnose_rows(src, names[k], v)
        raise FormatError(f"{src}: malformed prediction rows")
    return rows.astype(np.float64, copy=False), counts


def load_predictions(path: str | os.PathLike, anno: dict | HicoGT) -> dict:
    """Read and validate a prediction file against a HICO-DET-format annotation.

    Returns ``{filename: float64[N, 10]}`` (file order).  Raises FormatError naming the
    file, the image and the field on any problem (empty file, invalid JSON, unknown image,
    wrong row length, non-numeric value, class out of range, NaN/inf, x2 < x1, y2 < y1).
    """
    gt = anno if isinstance(anno, HicoGT) else parse_hico_anno(anno)
    obj = read(path, "prediction file")
    rows, img = prediction_rows(obj, gt.filenames, gt.index, gt.num_classes, str(path))
    counts = [len(v) for v in obj.values()]
    splits = np.split(rows, np.cumsum(counts)[:-1]) if counts else []
    return dict(zip(obj.keys(), splits))



# ---------------------------------------------------------------------------------------
# SWiG-HOI annotation and meta tables
# ---------------------------------------------------------------------------------------

@dataclass
class SwigGT:
    name: str
    filenames: list
    index: dict
    num_classes: int                 # len(SWIG_INTERACTIONS)
    eval_ids: np.ndarray             # int64[E] evaluated interaction ids (ascending)
    frequency: np.ndarray            # int64[K] 0 unseen / 1 rare / 2 non-rare
    gt_class: np.ndarray
    gt_image: np.ndarray
    gt_boxes: np.ndarray             # float64[M, 8]
    num_no_object: int = 0           # pairs with object_id -1, left out


def load_swig_meta(path=None) -> dict:
    """swig_v1_meta.json (default: the shared data), validated (swig_meta_tables)."""
    path = path or data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
    meta = read(path, "SWiG meta file")
    try:
        swig_meta_tables(meta)
    except ValueError as e:
        raise FormatError(f"{path}: SWiG meta file: {e}") from None
    return meta


def parse_swig_gt(anno: Any, meta: dict, name: str = "<anno>") -> SwigGT:
    """THID/SWiG annotation list -> GT arrays (all interactions; only evaluated ones reported).
    Checked like the predictions: box indices point into box_annotations (a negative one never
    wraps around to another box), boxes finite with x2 >= x1, ids and categories integers.
    A pair with object_id -1 (no object, as data.SWiGHOI reads it) is left out and counted."""
    try:
        _, actions, inter = swig_meta_tables(meta)
    except ValueError as e:
        raise FormatError(f"<meta>: SWiG meta file: {e}") from None
    K = len(inter)
    freq = np.array([x["frequency"] for x in inter], dtype=np.int64)
    mapper = {(x["action_id"], x["object_id"]): x["id"] for x in inter}
    eval_ids = [x["id"] for x in inter if x["evaluation"] == 1]
    if not isinstance(anno, list):
        raise FormatError(f"{name}: expected the SWiG-HOI json: a list of images with "
                             f"file_name, box_annotations, hoi_annotations")
    filenames, index = [], {}
    cls_l, img_l, box_l, no_object = [], [], [], 0
    for i, im in enumerate(anno):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            raise FormatError(f"{name}: image entry {i}: missing field 'file_name'")
        fn = im["file_name"]
        if fn in index:
            raise FormatError(f"{name}: image '{fn}': duplicate file_name")
        index[fn] = i
        filenames.append(fn)
        for c, b, skipped in _swig_pairs(im, mapper, len(actions), f"{name}: image '{fn}'"):
            no_object += skipped
            if not skipped:
                cls_l.append(c)
                img_l.append(i)
                box_l.append(b)
    return SwigGT(name=name, filenames=filenames, index=index, num_classes=K,
                  eval_ids=np.array(sorted(eval_ids), dtype=np.int64), frequency=freq,
                  gt_class=np.array(cls_l, dtype=np.int64), gt_image=np.array(img_l, dtype=np.int64),
                  gt_boxes=np.array(box_l, dtype=np.float64).reshape(-1, 8), num_no_object=no_object)


def _swig_pairs(im: dict, mapper: dict, num_actions: int, where: str):
    """Yield (class, [h box, o box], skipped) for each hoi_annotations entry of an image."""
    boxes = im.get("box_annotations", []) or []
    hois = im.get("hoi_annotations", []) or []
    if not isinstance(boxes, list) or not isinstance(hois, list):
        raise FormatError(f"{where}: fields 'box_annotations' and 'hoi_annotations' must be lists")
    for h, hoi in enumerate(hois):
        field_ = f"hoi_annotations[{h}]"
        try:
            if not isinstance(hoi, dict):
                raise ValueError("expected {subject_id, object_id, action_id}")
            field_ = f"hoi_annotations[{h}].object_id"
            if is_number(hoi.get("object_id")) and hoi["object_id"] == -1:
                yield -1, None, 1
                continue
            o = as_index(hoi.get("object_id"), len(boxes))
            field_ = f"hoi_annotations[{h}].subject_id"
            sb = _swig_box(boxes, as_index(hoi.get("subject_id"), len(boxes)))
            field_ = f"box_annotations[{o}]"
            ob, cat = _swig_box(boxes, o), as_index(boxes[o].get("category_id"))
            field_ = f"hoi_annotations[{h}].action_id"
            key = (as_index(hoi.get("action_id"), num_actions), cat)
        except ValueError as e:
            raise FormatError(f"{where}: field '{field_}': {e}") from None
        if key not in mapper:
            raise FormatError(f"{where} hoi_annotations[{h}]: (action_id, object category) = {key} "
                                 f"is not a SWiG-HOI interaction")
        yield mapper[key], sb + ob, 0


def _swig_box(boxes: list, j: int) -> list:
    b = boxes[j]
    if not isinstance(b, dict) or "bbox" not in b:
        raise ValueError(f"box_annotations[{j}] needs 'bbox' [x1, y1, x2, y2] and 'category_id'")
    return as_box(b["bbox"])



# ---------------------------------------------------------------------------------------
# V-COCO: VSRL + COCO instances, vsrl_eval detections
# ---------------------------------------------------------------------------------------

@dataclass
class VCOCOGt:
    """Per-image V-COCO ground truth, as vsrl_eval's vcocodb (person rows only)."""
    actions: list                      # A action names
    roles: list                        # A lists: ['agent', role1, ...]
    image_ids: list                    # sorted image ids
    boxes: dict = field(default_factory=dict)      # image id -> float32[G, 4] all valid objects
    person: dict = field(default_factory=dict)     # image id -> int64[P] rows of persons in boxes
    actions_gt: dict = field(default_factory=dict)  # image id -> int[P, A] (-1 ignored, 0/1)
    role_gt: dict = field(default_factory=dict)    # image id -> int[P, A, 2] row in boxes or -1



def parse_vcoco_gt(vsrl: Any, coco: Any, vsrl_name: str = "<vsrl>", coco_name: str = "<coco>") -> VCOCOGt:
    """Build the V-COCO ground truth from the official VSRL list and COCO instances dict."""
    acts, roles, data = _vsrl_actions(vsrl, vsrl_name)
    base_ann, lab_mat, roi_mat = _vsrl_labels(acts, data, vsrl_name)
    pos_of_ann = {int(v): i for i, v in enumerate(base_ann)}     # VSRL person -> row of lab_mat
    image_ids = sorted({int(v) for v in data[0][0]})
    person_cat, sizes, anns_by_img = _coco_index(coco, image_ids, coco_name)
    gt = VCOCOGt(actions=acts, roles=roles, image_ids=image_ids)
    for img, aid in zip(data[0][0].tolist(), data[0][1].tolist()):
        if not any(is_number(an.get("id")) and an["id"] == aid for an in anns_by_img.get(img, [])):
            raise FormatError(f"{vsrl_name}: ann_id {aid} of image {img} is not an annotation of that "
                                 f"image in {coco_name}")
    for i in image_ids:
        if i not in sizes:
            raise FormatError(f"{coco_name}: image {i} (in {vsrl_name}) not in 'images'")
        boxes, ids, is_person = _coco_boxes(anns_by_img[i], sizes[i], person_cat, coco_name, i)
        pid = np.flatnonzero(np.array(is_person, dtype=bool))
        row_of_id = {v: r for r, v in enumerate(ids)}
        act = -np.ones((pid.size, len(acts)), dtype=np.int64)
        rol = -np.ones((pid.size, len(acts), 2), dtype=np.int64)
        for p, r in enumerate(pid):
            aid = ids[r]
            if aid not in pos_of_ann:
                continue
            q = pos_of_ann[aid]
            act[p] = lab_mat[q]
            for a in np.flatnonzero(lab_mat[q]):
                for j in range(len(roles[a]) - 1):
                    oid = int(roi_mat[q, a, j])
                    if oid == 0:
                        continue
                    if oid not in row_of_id:
                        raise FormatError(f"{vsrl_name}: image {i} ann_id {aid} action "
                                             f"'{acts[a]}' role '{roles[a][j + 1]}': role object "
                                             f"{oid} is not a valid annotation of that image in "
                                             f"{coco_name}")
                    rol[p, a, j] = row_of_id[oid]
        gt.boxes[i] = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        gt.person[i] = pid
        gt.actions_gt[i] = act
        gt.role_gt[i] = rol
    return gt


def _vsrl_actions(vsrl: Any, vsrl_name: str) -> tuple[list, list, list]:
    """The VSRL list -> (action names, role names per action, (image_id, ann_id, label,
    role_object_id [N, roles]) int64 arrays per action), validated."""
    if not isinstance(vsrl, list) or not vsrl:
        raise FormatError(f"{vsrl_name}: expected the official VSRL list (one entry per action)")
    acts, roles, data = [], [], []
    for a, x in enumerate(vsrl):
        if not isinstance(x, dict):
            raise FormatError(f"{vsrl_name}: entry {a} must be an object")
        for key in ("action_name", "role_name", "image_id", "ann_id", "label", "role_object_id"):
            if key not in x:
                raise FormatError(f"{vsrl_name}: action entry {a}: missing key '{key}'")
        name = x["action_name"]
        rn = x["role_name"]
        if not isinstance(name, str) or name in acts:
            raise FormatError(f"{vsrl_name}: action entry {a}: field 'action_name' must be a string "
                                 f"naming each action once, got {name!r}")
        if not isinstance(rn, list) or not rn or rn[0] != "agent" or len(rn) > 3 or \
                not all(isinstance(r, str) for r in rn) or first_duplicate(rn) is not None:
            raise FormatError(f"{vsrl_name}: action '{name}': field 'role_name' must be "
                                 f"['agent', ...] with at most 2 other distinct roles")
        img, ann, lab, roi = (_int_vector(x[k], f"{vsrl_name}: action '{name}': field '{k}'")
                              for k in ("image_id", "ann_id", "label", "role_object_id"))
        if roi.size % len(rn) or not (img.size == ann.size == lab.size == roi.size // len(rn)):
            raise FormatError(f"{vsrl_name}: action '{name}': image_id, ann_id, label and "
                                 f"role_object_id (len(role_name) x N) have different lengths")
        roi = roi.reshape(len(rn), -1).T
        if not np.isin(lab, (0, 1)).all():
            raise FormatError(f"{vsrl_name}: action '{name}': field 'label' must hold 0 or 1, "
                                 f"got {int(lab[~np.isin(lab, (0, 1))][0])}")
        dup = first_duplicate(ann.tolist())
        if dup is not None:
            raise FormatError(f"{vsrl_name}: action '{name}': field 'ann_id' lists person {dup} twice")
        acts.append(name)
        roles.append(list(rn))
        data.append((img, ann, lab, roi))
    return acts, roles, data


def _int_vector(v: Any, where: str) -> np.ndarray:
    """A (possibly nested) list of integers -> int64[N]: no fraction, bool, NaN or overflow."""
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise FormatError(f"{where}: expected a list of integers") from None
    bad = ~np.isfinite(a) | (a != np.floor(a)) | (np.abs(a) >= 2.0 ** 63)
    if bad.any() or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
        raise FormatError(f"{where}: expected integers, got {a[bad][0] if bad.any() else 'a boolean'!r}")
    return a.astype(np.int64)


def _vsrl_labels(acts: list, data: list, vsrl_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per VSRL person (the first action's ann_id order): (ann_id int64[M], action labels
    int64[M, A], role object ids int64[M, A, 2]); every action must list the same persons."""
    A = len(acts)
    base_ann = data[0][1]
    for a in range(1, A):
        if not np.array_equal(data[a][1], base_ann):
            raise FormatError(f"{vsrl_name}: action '{acts[a]}': field 'ann_id' differs from the "
                                 f"first action's (the official file lists every person for every action)")
    pos_of_ann = {int(v): i for i, v in enumerate(base_ann)}
    lab_mat = np.zeros((base_ann.size, A), dtype=np.int64)
    roi_mat = np.zeros((base_ann.size, A, 2), dtype=np.int64)
    for a, (img, ann, lab, roi) in enumerate(data):
        rows = np.flatnonzero(lab == 1)
        idx = np.array([pos_of_ann[int(v)] for v in ann[rows]], dtype=np.int64)
        if np.unique(idx).size != idx.size:
            raise FormatError(f"{vsrl_name}: action '{acts[a]}': a person has label 1 twice")
        lab_mat[idx, a] = 1
        bad = roi[rows, 0] != ann[rows]
        if bad.any():
            raise FormatError(f"{vsrl_name}: action '{acts[a]}' ann_id {int(ann[rows][bad][0])}: "
                                 f"role_object_id[:, 0] must equal ann_id")
        roi_mat[idx, a, :roi.shape[1] - 1] = roi[rows, 1:]
    return base_ann, lab_mat, roi_mat


def _coco_index(coco: Any, image_ids: list, coco_name: str) -> tuple[Any, dict, dict]:
    """COCO instances dict -> (person category id, {image id: (width, height)},
    {image id: [annotation dicts]}) for the wanted image ids."""
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list) or \
            not isinstance(coco.get("images"), list):
        raise FormatError(f"{coco_name}: expected a COCO instances JSON with 'images' and "
                             f"'annotations' (lists)")
    person_cat = 1
    cats = coco.get("categories")
    if isinstance(cats, list):
        for c in cats:
            if isinstance(c, dict) and c.get("name") == "person":
                person_cat = c.get("id")
    wanted = set(image_ids)
    sizes = {}
    for im in coco["images"]:
        if isinstance(im, dict) and is_number(im.get("id")) and im["id"] in wanted:
            w, h = im.get("width"), im.get("height")
            if not (is_number(w) and is_number(h) and 0 < w < math.inf and 0 < h < math.inf):
                raise FormatError(f"{coco_name}: image {im.get('id')}: fields 'width'/'height' must "
                                     f"be positive numbers, got {w!r}, {h!r}")
            if int(im["id"]) in sizes:
                raise FormatError(f"{coco_name}: image {im['id']} listed twice in 'images'")
            sizes[int(im["id"])] = (float(w), float(h))
    anns_by_img: dict = {i: [] for i in image_ids}
    for k, an in enumerate(coco["annotations"]):
        if not isinstance(an, dict):
            raise FormatError(f"{coco_name}: annotation {k} must be an object")
        try:
            i = as_index(an.get("image_id"))
        except ValueError as e:
            raise FormatError(f"{coco_name}: annotation {k}: field 'image_id': {e}") from None
        if i in anns_by_img:
            anns_by_img[i].append(an)
    return person_cat, sizes, anns_by_img


def _coco_boxes(anns: list, size: tuple, person_cat, coco_name: str, image_id: int) -> tuple[list, list, list]:
    """One image's COCO annotations -> (boxes, annotation ids, is-person flags) of the valid
    ones, as vsrl_eval: [x, y, x + max(0, w - 1), y + max(0, h - 1)] clipped to the image;
    ignored, zero-area and extent-less annotations are dropped."""
    width, height = size
    boxes, ids, is_person = [], [], []
    for an in anns:
        try:
            if an.get("ignore", 0) == 1:
                continue
            b = an["bbox"]
            if not (isinstance(b, list) and len(b) == 4 and all(is_number(v) and math.isfinite(v) for v in b)) \
                    or not is_number(an["area"]) or not math.isfinite(an["area"]):
                raise ValueError
            as_index(an["id"])
            x, y, w, h = (float(v) for v in b)
            x1, y1 = x, y
            x2 = x1 + max(0.0, w - 1.0)
            y2 = y1 + max(0.0, h - 1.0)
            x1 = min(width - 1.0, max(0.0, x1))
            y1 = min(height - 1.0, max(0.0, y1))
            x2 = min(width - 1.0, max(0.0, x2))
            y2 = min(height - 1.0, max(0.0, y2))
            if an["area"] > 0 and x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                ids.append(int(an["id"]))
                is_person.append(an["category_id"] == person_cat)
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{coco_name}: image {image_id} annotation {an.get('id')}: missing or "
                                 f"malformed field (needs id, bbox [x, y, w, h], area, "
                                 f"category_id)") from None
    return boxes, ids, is_person



@dataclass
class VCOCODets:
    """Detections in vsrl_eval's layout, concatenated in file order.

    img: int64[D] position of the image in gt.image_ids; person: float32[D, 4];
    agent: float32[D, A] agent scores (NaN = not predicted); role: float32[D, R, 5] role box +
    score for the R action-roles ``gt.role_keys()`` (NaN score = not predicted).
    """
    img: np.ndarray
    person: np.ndarray
    agent: np.ndarray
    role: np.ndarray


def vcoco_role_keys(gt: VCOCOGt) -> list:
    """[(action index, role index)] of every action-role, vsrl_eval order."""
    return [(a, r) for a in range(len(gt.actions)) for r in range(len(gt.roles[a]) - 1)]


def load_vcoco_dets(obj: Any, gt: VCOCOGt, src: str):
    """vsrl_eval detection list -> (VCOCODets, unknown keys, number of detections).

    Missing/null keys mean "not predicted" (NaN), as vsrl_eval's NaN convention.
    """
    if not isinstance(obj, list):
        raise FormatError(f"{src}: expected a JSON list of detections {{'image_id', 'person_box', "
                             f"'<action>_agent', '<action>_<role>'}}")
    img, person = _vcoco_det_persons(obj, gt, src)
    agent_keys = [f"{name}_agent" for name in gt.actions]
    role_keys = [f"{gt.actions[a]}_{gt.roles[a][r + 1]}" for a, r in vcoco_role_keys(gt)]
    D = len(obj)
    agent = np.full((D, len(agent_keys)), np.nan, dtype=np.float32)
    for a, key in enumerate(agent_keys):
        agent[:, a] = _vcoco_score_column(obj, key, gt, img, src)
    role = np.full((D, len(role_keys), 5), np.nan, dtype=np.float32)
    for q, key in enumerate(role_keys):
        role[:, q] = _vcoco_role_column(obj, key, gt, img, src)
    unknown: set = set()
    for d in obj[:1000]:                                        # a sample is enough to warn
        unknown.update(d.keys())
    known = {"image_id", "person_box", *agent_keys, *role_keys}
    return VCOCODets(img=img, person=person, agent=agent, role=role), sorted(unknown - known), D


def _vcoco_det_persons(obj: list, gt: VCOCOGt, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's image (position in gt.image_ids, int64[D]) and person box float32[D, 4]."""
    pos = {i: k for k, i in enumerate(gt.image_ids)}
    img = np.empty(len(obj), dtype=np.int64)
    person = []
    for k, d in enumerate(obj):
        if not isinstance(d, dict):
            raise FormatError(f"{src}: detection {k}: must be an object")
        i = d.get("image_id")
        if not is_number(i) or i != int(i):
            raise FormatError(f"{src}: detection {k}: field 'image_id' missing or not an integer")
        p = pos.get(int(i))
        if p is None:
            raise FormatError(f"{src}: image_id {int(i)} detection {k}: image not in the V-COCO "
                                 f"ground truth")
        img[k] = p
        pb = d.get("person_box")
        if not (isinstance(pb, list) and len(pb) == 4 and all(is_number(v) and math.isfinite(v) for v in pb)):
            raise FormatError(f"{src}: image_id {int(i)} detection {k}: field 'person_box' must be "
                                 f"4 finite numbers [x1, y1, x2, y2]")
        if pb[2] < pb[0] or pb[3] < pb[1]:
            raise FormatError(f"{src}: image_id {int(i)} detection {k}: "
                                 f"{'x2 < x1' if pb[2] < pb[0] else 'y2 < y1'} in field 'person_box'")
        person.append(pb)
    return img, np.array(person, dtype=np.float32).reshape(len(obj), 4)


_SCORE_TYPES = {float, int, type(None)}


def _bad_score(v) -> bool:
    return not (v is None or (type(v) in (float, int) and not math.isinf(v)))


def _bad_role(v) -> bool:
    return v is not None and not (type(v) is list and len(v) == 5 and not any(map(_bad_score, v)))


def _vcoco_where(src: str, gt: VCOCOGt, img: np.ndarray, k: int) -> str:
    return f"{src}: image_id {gt.image_ids[int(img[k])]} detection {k}"


def _vcoco_score_column(obj: list, key: str, gt: VCOCOGt, img: np.ndarray, src: str) -> np.ndarray:
    """The scores obj[k][key] -> float64[D] (missing/null -> NaN). Fast path: one type check
    and one conversion; the first bad value is looked for only when they fail."""
    vals = [d.get(key) for d in obj]
    arr = None
    if set(map(type, vals)) <= _SCORE_TYPES:                   # fast type check (C loops)
        arr = np.array(vals, dtype=np.float64).reshape(len(obj))
    if arr is None or np.isinf(arr).any():
        k = next(k for k, v in enumerate(vals) if _bad_score(v))
        raise FormatError(f"{_vcoco_where(src, gt, img, k)}: field '{key}' must be a score (number, "
                             f"NaN or null = not predicted)")
    return arr


def _vcoco_role_column(obj: list, key: str, gt: VCOCOGt, img: np.ndarray, src: str) -> np.ndarray:
    """The role boxes + scores obj[k][key] -> float64[D, 5] (missing/null -> NaN), fast path
    as _vcoco_score_column."""
    vals = [d.get(key) for d in obj]
    arr = None
    if set(map(type, vals)) <= {list, type(None)}:
        lists = [v for v in vals if v is not None]
        if set(map(len, lists)) <= {5} and set(map(type, chain.from_iterable(lists))) <= _SCORE_TYPES:
            nan5 = [np.nan] * 5
            arr = np.array([nan5 if v is None else v for v in vals], dtype=np.float64).reshape(len(obj), 5)
    if arr is None or np.isinf(arr).any():
        k = next(k for k, v in enumerate(vals) if _bad_role(v))
        raise FormatError(f"{_vcoco_where(src, gt, img, k)}: field '{key}' must be [x1, y1, x2, y2, "
                             f"score] (finite or NaN/null; NaN/null score = not predicted)")
    return arr

