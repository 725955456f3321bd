"""One validated reader per input file format; torch-free (numpy only).

- HICO-DET-format annotation (fredzzhang/hicodet JSON, the synthetic world): ``parse_hico_anno``; its prediction
  rows ``{file_name: [[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], ...]}``: ``load_predictions``
- SWiG-HOI annotation and meta tables: ``parse_swig_gt``, ``load_swig_meta``
- V-COCO VSRL + COCO instances: ``vsrl_actions``, ``coco_index``, ``coco_boxes`` (``eval.parse_vcoco_gt`` assembles
  them); vsrl_eval detections: ``load_vcoco_dets``; fredzzhang's instances_vcoco: ``parse_vcoco_pairs``
- detection files per image (``image_detections``) and COCO results (``coco_result``)
- the value checks every reader shares (``as_index``, ``boxes_array``, ...), the protocols' IoU per box frame

Every problem raises :class:`FormatError` (a ValueError; ``eval.EvalInputError``, ``data.DataError``) with one
line ``FILE: image 'NAME' row R: field: problem`` (parts that do not apply are left out).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Optional, Sequence

import numpy as np

from common import BOX_FRAMES, ZERO_SHOT_SPLITS, data_root, read_json

#: COCO-80 object names in the order used by fredzzhang/hicodet (``objects``), underscores.
COCO80_NAMES = """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign
parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase
frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle
wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch
potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink
refrigerator book clock vase scissors teddy_bear hair_drier toothbrush""".split()
#: COCO category id (the 91-id space of COCO results files) of each COCO-80 index: 1..90 less the 10 unused ids.
#: (shared/data/hicodet/coco91tohico80.json maps to the ALPHABETICAL HICO object order, person -> 49, not COCO-80.)
COCO80_TO_COCO91 = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO91_TO_COCO80 = {cid: i for i, cid in enumerate(COCO80_TO_COCO91)}


class FormatError(ValueError):
    """Bad input file; the one-line message names the file, the image, the row and the field."""


class FormatFileNotFoundError(FormatError, FileNotFoundError):
    """An input file does not exist."""


def where(file, image=None, row=None, field_=None) -> str:
    """``FILE: image 'NAME' row R: field`` (the parts given)."""
    out = str(file) + (f": image {str(image)!r}" if image is not None else "")
    out += (f" row {row}" if image is not None else f": row {row}") if row is not None else ""
    return out + (f": {field_}" if field_ is not None else "")


def fail(file, problem, image=None, row=None, field_=None) -> FormatError:
    """The error ``FILE: image 'NAME' row R: field: problem``."""
    return FormatError(f"{where(file, image, row, field_)}: {problem}")


def require(d: dict, keys, file, image=None, row=None, kind: Optional[type] = None) -> None:
    """``FILE: image 'NAME' row R: KEY: missing key`` for the first of ``keys`` not in ``d`` (or not a ``kind``)."""
    bad = next((k for k in keys if k not in d or (kind is not None and not isinstance(d[k], kind))), None)
    if bad is not None:
        raise fail(file, "missing key" if kind is None else f"missing key or not a {kind.__name__}", image, row, bad)


def prompts_list(v: Any, n: int, file) -> list | None:
    """An optional ``prompts`` field: None, or n strings (one per class)."""
    if v is not None and not (isinstance(v, list) and len(v) == n and all(isinstance(p, str) for p in v)):
        raise fail(file, f"expected {n} strings", field_="prompts")
    return v


def read(path, what: str = "file") -> Any:
    """Parse a JSON file (common.read_json) -> object; FormatError naming the file on any problem."""
    return read_json(path, what, error=FormatError, missing=FormatFileNotFoundError)


# --- Values: the checks every reader shares (a ValueError's one-line reason; the caller adds where) ------------------


def check_numbers(a, file, image, field_: str, dtype=np.float32, box: bool = False, nan_ok: bool = False,
                  at: Optional[Callable] = None) -> np.ndarray:
    """The one number check: a [N, C] -> float64 a, else the FormatError naming its first bad row (``at``:
    row -> (image, row in the file); default (image, row)). Bad: a value not finite in ``dtype``, the dtype
    the evaluator computes in (1e39 is inf in float32), or with ``box`` (x1, y1, x2, y2 in columns 0-3)
    x2 < x1 or y2 < y1. ``nan_ok``: an all-NaN row is V-COCO's "not given" and passes."""
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(len(a), -1) if a.size else np.zeros((0, 4))
    bad = ~(np.abs(a) <= np.finfo(dtype).max)                 # NaN, inf and, in float32, |v| > 3.4e38
    bad = bad.any(1) & ~(nan_ok & np.isnan(a).all(1))
    problem = f"is non-finite in {np.dtype(dtype).name} (NaN, inf or beyond {np.dtype(dtype).name}'s range)"
    if box and not bad.any():
        bad, problem = (a[:, 2] < a[:, 0]) | (a[:, 3] < a[:, 1]), "has x2 < x1 or y2 < y1"
    if not bad.any():
        return a
    r = int(np.argmax(bad))
    value = a[r, 0] if a.shape[1] == 1 else a[r].tolist()
    raise fail(file, f"{value}: {problem}", *(at(r) if at else (image, r)), field_)


def is_number(v) -> bool:
    """int or float, never a bool (JSON true is not 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def as_index(v, n: Optional[int] = None, lo: int = 0, at: tuple = ()) -> int:
    """An integer (or integral float) in [lo, n); never a bool, a fraction, NaN, nor a wrapping negative.
    A ValueError, or with ``at`` = (file, image, row, field) the FormatError naming that place."""
    if not is_number(v) or not math.isfinite(v) or v != int(v):
        problem = f"{v!r} is not an integer index"
    elif int(v) < lo or (n is not None and int(v) >= n) or abs(int(v)) >= 2 ** 62:
        problem = f"index {int(v)} out of range [{lo}, {'' if n is None else n})"
    else:
        return int(v)
    raise fail(at[0], problem, *at[1:]) if at else ValueError(problem)


def as_index_list(v, n: Optional[int] = None, lo: int = 0, unique: bool = False, at: tuple = ()) -> list:
    """A list of indices (as_index each); ``unique``: no index twice; ``at`` as for as_index."""
    try:
        if not isinstance(v, list):
            raise ValueError(f"expected a list of integer indices, got {type(v).__name__}")
        out = []
        for r, x in enumerate(v):
            try:
                out.append(as_index(x, n, lo))
            except ValueError as e:
                raise ValueError(f"entry {r}: {e}") from None
        if unique and first_duplicate(out) is not None:
            raise ValueError(f"index {first_duplicate(out)} listed twice")
        return out
    except ValueError as e:
        if not at:
            raise
        raise fail(at[0], e, *at[1:]) from None


def first_duplicate(items) -> Optional[Any]:
    """The first item seen twice in ``items`` (None when all differ)."""
    seen: set = set()
    return next((x for x in items if x in seen or seen.add(x)), None)     # add() is None: falsy


# --- Boxes: overlap in the two box frames (common.BOX_FRAMES), the unique GT boxes of an image ------------------------

def iou_inclusive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU, the MATLAB toolkit's inclusive +1: a, b float64[n, 4] -> float64[n], 0 unless
    iw > 0 and ih > 0; VOCevaldet_bboxpair.m's operation order (bit-identical)."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = iw * ih
    ua = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1) + (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1) - inter
    out = np.zeros(a.shape[0])
    np.divide(inter, ua, out=out, where=(iw > 0) & (ih > 0))
    return out


def iou_continuous(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise plain IoU of the THID SWiG evaluator: a, b float64[n, 4] -> float64[n]; sides and
    intersection clamped at 0, IoU 0 when the intersection is <= 0."""
    area_a = np.maximum(a[:, 2] - a[:, 0], 0.0) * np.maximum(a[:, 3] - a[:, 1], 0.0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(b[:, 3] - b[:, 1], 0.0)
    xi = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0)
    yi = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0)
    inter = xi * yi
    den = area_a + area_b - inter
    out = np.zeros(a.shape[0])
    np.divide(inter, den, out=out, where=inter > 0)
    return out


def unique_boxes(boxes_h, boxes_o, objects, person: int) -> tuple:
    """One image's unique boxes (equal float32 box and label count once), humans (``person``) first ->
    (boxes float32[n, 4], labels int64[n], idx_h int64[P], idx_o int64[P]: each pair's boxes)."""
    b = np.concatenate([np.asarray(boxes_h, np.float32).reshape(-1, 4), np.asarray(boxes_o, np.float32).reshape(-1, 4)])
    P = len(b) // 2
    lab = np.concatenate([np.full(P, person), np.asarray(objects).reshape(-1)]).astype(np.int64)
    first: dict = {}
    idx = np.array([first.setdefault(key, len(first)) for key in zip(map(tuple, b.tolist()), lab.tolist())],
                   dtype=np.int64)
    keep = np.unique(idx, return_index=True)[1]          # first row of each unique box
    return b[keep], lab[keep], idx[:P], idx[P:]


# --- HICO-DET-format annotation file and prediction rows --------------------------------------------------------------

#: the columns of a prediction row
ROW_FIELDS = ("hoi", "score", "hx1", "hy1", "hx2", "hy2", "ox1", "oy1", "ox2", "oy2")


@dataclass
class HicoGT:
    """A HICO-DET-format annotation (:func:`parse_hico_anno`); GT rows in image order, then row order."""
    name: str
    filenames: list
    index: dict                     # filename -> image index
    num_classes: int
    obj_of_class: np.ndarray        # int64[K] object index of each class
    gt_class: np.ndarray            # int64[M]
    gt_image: np.ndarray            # int64[M] non-decreasing
    gt_boxes: np.ndarray            # float64[M, 8] human box, object box
    rare: list | None
    non_rare: list | None
    zero_shot: dict | None
    num_empty: int = 0
    correspondence: np.ndarray = None   # int64[K, 3] [hoi, object, verb] (verb -1 if not given)
    objects: list | None = None         # O object names, verbs: V verb names (None when absent)
    verbs: list | None = None
    gt_object: np.ndarray = None        # int64[M] each row's object / verb (None when absent)
    gt_verb: np.ndarray = None
    empty: list = field(default_factory=list)
    sizes: list | None = None           # per image (w, h) ints, None when the file has none
    prompts: list | None = None
    box_frame: str = "hico1"            # common.BOX_FRAMES, see hico_box_frame


#: the per-pair lists of an annotation entry; the last two are optional for the evaluator
HICO_ROW_KEYS = ("boxes_h", "boxes_o", "hoi", "object", "verb")


def parse_hico_anno(anno: Any, name: str = "<anno>", names: bool = False) -> HicoGT:
    """A HICO-DET-format annotation (parsed JSON) -> HicoGT; the keys it needs and checks: docs/data.md.
    ``names``: the dataset's reading, which also needs ``objects``, ``verbs``, each entry's object / verb."""
    if not isinstance(anno, dict):
        raise fail(name, f"expected a JSON object with key 'annotation' (fredzzhang/hicodet format), "
                         f"got {type(anno).__name__}")
    require(anno, ("annotation", "filenames", "correspondence") + (("objects", "verbs") if names else ()), name)
    fns = name_list(anno["filenames"], name, "filenames")
    objects, verbs = (name_list(anno[k], name, k) if anno.get(k) is not None else None for k in ("objects", "verbs"))
    annos = anno["annotation"]
    if not isinstance(annos, list) or len(annos) != len(fns):
        raise fail(name, f"{len(fns)} file names for {len(annos) if isinstance(annos, list) else 'no list of'} "
                         f"annotations", field_="filenames")
    corr = _correspondence(anno["correspondence"], objects, verbs, name, names)
    K = corr.shape[0]
    gt_class, gt_image, gt_boxes, gt_obj, gt_verb = _hico_pairs(annos, fns, corr, objects, verbs, name, names)
    rare, non_rare = (_index_list(anno, k, K, name) for k in ("rare", "non_rare"))
    if rare and non_rare and set(rare) & set(non_rare):
        raise fail(name, f"class {min(set(rare) & set(non_rare))} is both rare and non-rare", field_="non_rare")
    empty = _index_list(anno, "empty", len(fns), name) or []
    zs = anno.get("zero_shot")
    if zs is not None and not isinstance(zs, dict):
        raise fail(name, "expected an object {split: [hoi, ...]}", field_="zero_shot")
    prompts = prompts_list(anno.get("prompts"), K, name)
    sizes = anno.get("size")
    if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(fns)):
        raise fail(name, f"expected a list of {len(fns)} [w, h], one per image", field_="size")
    sizes = None if sizes is None else [image_size(s, name, f) for s, f in zip(sizes, fns)]
    return HicoGT(name=name, filenames=fns, index={f: i for i, f in enumerate(fns)}, num_classes=K,
                  obj_of_class=corr[:, 1].copy(), gt_class=gt_class, gt_image=gt_image, gt_boxes=gt_boxes, rare=rare,
                  non_rare=non_rare, zero_shot=zs, num_empty=len(empty), correspondence=corr, objects=objects,
                  verbs=verbs, gt_object=gt_obj, gt_verb=gt_verb, empty=empty, sizes=sizes, prompts=prompts,
                  box_frame=hico_box_frame(anno, name))


def hico_box_frame(anno: dict, name, frame: Optional[str] = None) -> str:
    """``frame``, else the file's ``box_frame``, else continuous for an old synthetic world, else hico1."""
    if frame is None:
        frame = anno.get("box_frame", "continuous" if anno.get("name") == "synthetic" else "hico1")
    if frame not in BOX_FRAMES:
        raise fail(name, f"{frame!r} is not one of {sorted(BOX_FRAMES)}", field_="box_frame")
    return frame


def zero_shot_unseen(zero_shot: Any, zs: Optional[dict], K: int, name) -> tuple[str, list]:
    """A zero-shot split (class indices, or a name looked up in the file's ``zero_shot`` dict ``zs``, else
    in the shared 600-class splits; docs/data.md) -> (split name, sorted unseen classes)."""
    src = name
    if not isinstance(zero_shot, str):
        label, idx = "custom", [int(x) if isinstance(x, np.integer) else x for x in zero_shot]
    else:
        canon = ZERO_SHOT_SPLITS.get(zero_shot.lower(), zero_shot.lower())
        cli = {v: k for k, v in ZERO_SHOT_SPLITS.items()}.get(canon)
        keys = [zero_shot] + ([cli, canon, cli.upper()] if cli else [])
        hit = next((k for k in keys if k in (zs or {})), None)
        if hit is None and (zs is not None or cli is None):
            raise fail(name, f"no split {zero_shot!r}; the file has {sorted(zs)}" if cli and zs is not None else
                       f"unknown split {zero_shot!r} (expected one of {', '.join(ZERO_SHOT_SPLITS)}"
                       + (f" or a key of {sorted(zs)})" if zs else ")"), field_="zero_shot")
        label = cli or zero_shot
        if hit is not None:
            idx = zs[hit]
        elif K != 600:
            raise fail(name, f"no 'zero_shot' field and {K} classes (the shared splits are for the 600 HICO-DET "
                             f"classes; add a 'zero_shot' dict to the annotation file)", field_="zero_shot")
        else:
            src = data_root() / "hicodet" / "derived" / "zero_shot_unseen_hoi_indices.json"
            d = read(src, "zero-shot split file")
            idx = d.get("splits", {}).get(canon) if isinstance(d, dict) and isinstance(d.get("splits"), dict) else None
            if idx is None:
                raise fail(src, f"missing split 'splits.{canon}'")
    idx = idx.get("unseen") if isinstance(idx, dict) else idx            # the {"unseen": [...], ...} form
    try:
        return label, sorted(set(as_index_list(idx, K)))
    except ValueError as e:
        raise fail(src, f"split {label!r} must be a list of class indices in [0, {K}) ({e})",
                   field_="zero_shot") from None


def name_list(v: Any, file, field_: str) -> list:
    """A list of names (file names, objects, verbs, classes): strings, each once."""
    if not isinstance(v, list):
        raise fail(file, f"expected a list of strings, got {type(v).__name__}", field_=field_)
    bad = next((r for r, x in enumerate(v) if not isinstance(x, str)), None)
    if bad is not None:
        raise fail(file, f"entry {bad}: expected a string, got {v[bad]!r}", field_=field_)
    dup = first_duplicate(v)
    if dup is not None:
        raise fail(file, f"{dup!r} listed twice", field_=field_)
    return list(v)


def image_size(s: Any, file, image) -> tuple:
    """A ``size`` entry [w, h] (positive integers) -> (int w, int h)."""
    try:
        if not (isinstance(s, (list, tuple)) and len(s) == 2):
            raise ValueError
        return (as_index(s[0], lo=1), as_index(s[1], lo=1))
    except ValueError:
        raise fail(file, f"expected [w, h] (positive integers), got {s!r}", image, field_="size") from None


def boxes_array(value: Any, file, image, field_: str) -> np.ndarray:
    """A list of [x1, y1, x2, y2] -> float64[N, 4]: finite in float32 (:func:`check_numbers`), x2 >= x1, y2 >= y1."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise fail(file, f"expected a list of boxes, got {type(value).__name__}", image, field_=field_)
    if len(value) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != 4:
        r = next((r for r, b in enumerate(value) if not (isinstance(b, (list, tuple)) and len(b) == 4
                                                        and all(map(is_number, b)))), None)
        raise fail(file, f"expected [x1, y1, x2, y2] (4 numbers), got {value[r]!r}" if r is not None
                   else "expected boxes [x1, y1, x2, y2]", image, r, field_)
    return check_numbers(arr, file, image, field_, np.float32, box=True)     # the model and the APs: float32


def int_array(value: Any, n: int, lo: int, hi: int, file, image, field_: str) -> np.ndarray:
    """A list of n integer indices in [lo, hi) -> int64[n] (5.0 is 5; 5.5, NaN, strings, lists refused)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise fail(file, f"expected a list of integers, got {type(value).__name__}", image, field_=field_)
    if len(value) != n:
        raise fail(file, f"has {len(value)} entries, expected {n}", image, field_=field_)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or \
            not (np.isfinite(arr) & (arr == np.floor(arr)) & (arr >= lo) & (arr < hi)).all():
        for r, v in enumerate(value):         # slow path: the first bad entry
            as_index(v, hi, lo, at=(file, image, r, field_))
        raise fail(file, "expected integer indices", image, field_=field_)
    return arr.astype(np.int64)


def _correspondence(corr: Any, objects, verbs, name, names: bool) -> np.ndarray:
    """``correspondence`` -> int64[K, 3], row k = class k's [k, object, verb] (verb -1 when the
    entry is [hoi, object]); each class once, objects / verbs index their lists when given."""
    if not isinstance(corr, list) or not corr:
        raise fail(name, "expected a non-empty list of [hoi, object, verb]", field_="correspondence")
    K = len(corr)
    O, V = (None if x is None else len(x) for x in (objects, verbs))
    out = np.full((K, 3), -1, dtype=np.int64)
    for r, c in enumerate(corr):
        at = (name, None, None, f"correspondence[{r}]")
        if not isinstance(c, list) or len(c) not in ((3,) if names else (2, 3)):
            raise fail(name, "expected [hoi, object, verb]", field_=at[3])
        row = [as_index(c[0], K, at=at), as_index(c[1], O, at=at)] + [as_index(x, V, at=at) for x in c[2:]]
        if out[row[0], 0] >= 0:
            raise fail(name, f"class {row[0]} listed twice", field_=at[3])
        out[row[0], :len(row)] = row
    return out


def _index_list(anno: dict, key: str, n: int, name) -> list | None:
    """The optional anno[key] (rare, non_rare: classes; empty: images): indices in [0, n), each once."""
    return None if anno.get(key) is None else as_index_list(anno[key], n, unique=True, at=(name, None, None, key))


def _hico_pairs(annos: list, fns: list, corr: np.ndarray, objects, verbs, name, names: bool):
    """All images' GT rows -> (class, image int64[M], boxes float64[M, 8], object, verb int64[M] | None).
    Fast path: one conversion of every list; _diagnose_pairs looks for the bad value when it fails."""
    with_ov = names or all(isinstance(a, dict) and "object" in a and "verb" in a for a in annos)
    keys = HICO_ROW_KEYS if with_ov else HICO_ROW_KEYS[:3]
    cols, counts = {k: [] for k in keys}, []
    for i, a in enumerate(annos):
        if not isinstance(a, dict):
            raise fail(name, "expected an object", fns[i], field_="annotation")
        for key in keys:
            if key not in a:
                raise fail(name, "missing key", fns[i], field_=key)
            if not isinstance(a[key], list):
                raise fail(name, f"expected a list, got {type(a[key]).__name__}", fns[i], field_=key)
        n = len(a["hoi"])
        for key in keys:
            if len(a[key]) != n:
                raise fail(name, f"has {len(a[key])} entries, 'hoi' has {n}", fns[i], field_=key)
            cols[key].append(a[key])
        counts.append(n)
    m = sum(counts)
    gt_image = np.repeat(np.arange(len(annos), dtype=np.int64), counts)
    try:
        v = {k: np.array(list(chain.from_iterable(cols[k])), dtype=np.float64) for k in keys}
        for k in ("boxes_h", "boxes_o"):
            v[k] = v[k].reshape(m, 4)
    except (ValueError, TypeError):
        _diagnose_pairs(annos, fns, keys, name)
        raise fail(name, "malformed entries", field_="annotation") from None
    K = corr.shape[0]
    O, V = (2 ** 62 if x is None else len(x) for x in (objects, verbs))

    def index_check(key, hi):       # (key, bad rows, message)
        x = v[key]
        return key, ~np.isfinite(x) | (x != np.floor(x)) | (x < 0) | (x >= hi), \
            lambda j: f"{x[j]:g}: is not an integer in [0, {hi})"

    def mismatch(j):
        c = corr[int(v["hoi"][j])]
        return (f"class {c[0]} is (object {c[1]}, verb {c[2]}) but the row says (object "
                f"{v['object'][j]:.0f}, verb {v['verb'][j]:.0f})")

    checks = [index_check("hoi", K)]
    for key in ("boxes_h", "boxes_o"):          # float32, as the model and the AP read them
        check_numbers(v[key], name, None, key, box=True, at=lambda j: (fns[gt_image[j]], j - int(
            np.searchsorted(gt_image, gt_image[j]))))
    if with_ov:
        hoi = np.clip(np.nan_to_num(v["hoi"]), 0, K - 1).astype(np.int64)
        checks += [index_check("object", O), index_check("verb", V),
                   ("hoi", (corr[hoi, 1] != v["object"]) | ((corr[hoi, 2] >= 0) & (corr[hoi, 2] != v["verb"])),
                    mismatch)]
    for key, bad, msg in checks:       # the annotation is checked like the predictions
        if bad.any():
            j = int(np.argmax(bad))
            i = int(gt_image[j])
            raise fail(name, msg(j), fns[i], j - int(np.searchsorted(gt_image, i)), key)
    ints = [v[k].astype(np.int64) if k in v else None for k in ("object", "verb")]
    return (v["hoi"].astype(np.int64), gt_image, np.concatenate([v["boxes_h"], v["boxes_o"]], axis=1), *ints)


def _diagnose_pairs(annos: list, fns: list, keys: tuple, name) -> None:
    """Slow path: raise on the first box that is not [x1, y1, x2, y2] or index that is not a number."""
    for i, a in enumerate(annos):
        for key, r, x in ((key, r, x) for key in keys for r, x in enumerate(a[key])):
            if not ((isinstance(x, list) and len(x) == 4 and all(map(is_number, x))) if key[:5] == "boxes" else
                    is_number(x)):
                raise fail(name, f"expected {'[x1, y1, x2, y2]' if key[:5] == 'boxes' else 'an integer'}, got {x!r}",
                           fns[i], r, key)


def _validate_rows(rows: np.ndarray, img: np.ndarray, filenames: Sequence[str], num_classes: int, src: str) -> None:
    """Vectorised value checks of prediction rows float64[N, 10] (img: int64[N], grouped)."""
    hoi = rows[:, 0]
    # fast path: a few passes (and nothing for no rows); the detailed checks run only on failure
    if (np.isfinite(rows).all() and ((hoi >= 0) & (hoi < num_classes) & (hoi == np.floor(hoi))).all()
            and (rows[:, 4:6] >= rows[:, 2:4]).all() and (rows[:, 8:10] >= rows[:, 6:8]).all()):
        return

    def at(j):                                      # rows are grouped by image, in any image order
        i = int(img[j])
        return filenames[i], j - int(np.flatnonzero(img == i)[0])

    for key, cols in (("hoi", [0]), ("score", [1]), ("human box", [2, 3, 4, 5]), ("object box", [6, 7, 8, 9])):
        check_numbers(rows[:, cols], src, None, key, np.float64, box=len(cols) == 4, at=at)   # the evaluators: float64
    bad = np.flatnonzero((hoi != np.floor(hoi)) | (hoi < 0) | (hoi >= num_classes))
    if bad.size:
        as_index(float(hoi[bad[0]]), num_classes, at=(src, *at(bad[0]), "hoi"))


def _diagnose_rows(src: str, name: str, rows: Any) -> None:
    """Slow path: find the first structurally malformed row of one image and raise."""
    if not isinstance(rows, list):
        raise fail(src, f"expected a list of rows [{', '.join(ROW_FIELDS)}], got {type(rows).__name__}", name)
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise fail(src, f"expected a list of 10 numbers, got {type(row).__name__}", name, r)
        if len(row) != 10:
            raise fail(src, f"expected 10 values [{', '.join(ROW_FIELDS)}], got {len(row)}", name, r)
        for c, v in enumerate(row):
            if not is_number(v):
                raise fail(src, f"not a number ({v!r})", name, r, ROW_FIELDS[c])


def prediction_rows(obj: Any, filenames: Sequence[str], index: dict, num_classes: int,
                          src: str) -> tuple[np.ndarray, np.ndarray]:
    """{filename: rows} (lists or arrays) -> (rows float64[N, 10], img int64[N]), validated; rows keep the
    object's image order (a JSON file's order), then row order."""
    if not isinstance(obj, dict):
        raise fail(src, f"expected a JSON object {{file_name: [[{', '.join(ROW_FIELDS)}], ...]}}, "
                        f"got {type(obj).__name__}")
    names = list(obj.keys())
    unknown = next((nm for nm in names if nm not in index), None)
    if unknown is not None:
        raise fail(src, "unknown image name (not in the annotation file)", unknown)
    vals = list(obj.values())
    arrays = any(isinstance(v, np.ndarray) or hasattr(v, "__array__") for v in vals)      # arrays / tensors
    rows, counts = (_rows_from_arrays if arrays else _rows_from_lists)(names, vals, src)
    img = np.repeat(np.array([index[nm] for nm in names], dtype=np.int64), counts)
    _validate_rows(rows, img, filenames, num_classes, src)
    return rows, img


def _rows_from_arrays(names: list, vals: list, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image arrays / tensors [n, 10] -> (rows float64[N, 10], rows per image int64[images])."""
    counts, parts = np.empty(len(vals), dtype=np.int64), []
    for k, v in enumerate(vals):
        try:
            a = np.asarray(v, dtype=np.float64)
        except (ValueError, TypeError):
            _diagnose_rows(src, names[k], v if isinstance(v, list) else list(v))
            raise fail(src, "malformed rows", names[k]) from None
        a = a.reshape(0, 10) if a.size == 0 else a
        if a.ndim != 2 or a.shape[1] != 10:
            raise fail(src, f"expected an array [N, 10] of rows [hoi, score, hx1, ..., oy2], got shape "
                            f"{tuple(a.shape)}", names[k])
        counts[k] = a.shape[0]
        parts.append(a)
    return (np.concatenate(parts, axis=0) if parts else np.zeros((0, 10))), counts


def _rows_from_lists(names: list, vals: list, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image lists of rows (parsed JSON) -> (rows float64[N, 10], rows per image); one conversion."""
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
        raise fail(src, "malformed prediction rows")
    return rows.astype(np.float64, copy=False), counts


def load_predictions(path: str | os.PathLike, anno: dict | HicoGT) -> dict:
    """A prediction file, validated against a HICO-DET-format annotation -> ``{filename: float64[N, 10]}``."""
    gt = anno if isinstance(anno, HicoGT) else parse_hico_anno(anno)
    obj = read(path, "prediction file")
    rows, img = prediction_rows(obj, gt.filenames, gt.index, gt.num_classes, str(path))
    counts = [len(v) for v in obj.values()]
    splits = np.split(rows, np.cumsum(counts)[:-1]) if counts else []
    return dict(zip(obj.keys(), splits))


# --- SWiG-HOI annotation and meta tables ------------------------------------------------------------------------------

@dataclass
class SwigGT:
    """A SWiG-HOI annotation (THID json), read and validated by :func:`parse_swig_gt`."""
    name: str
    filenames: list
    index: dict
    num_classes: int                 # len(SWIG_INTERACTIONS)
    eval_ids: np.ndarray             # int64[E] evaluated interaction ids (ascending)
    frequency: np.ndarray            # int64[K] 0 unseen / 1 rare / 2 non-rare
    gt_class: np.ndarray             # int64[M], rows in image order
    gt_image: np.ndarray             # int64[M]
    gt_boxes: np.ndarray             # float64[M, 8]
    num_no_object: int = 0           # pairs with object_id -1, left out
    num_unknown: int = 0             # pairs whose (action, category) is no interaction (skip_unknown)
    gt_action: np.ndarray = None     # int64[M] action_id, gt_category: int64[M] object category
    gt_category: np.ndarray = None
    sizes: list = None               # per image (w, h), or None where the entry has none
    tables: tuple = None             # swig_meta_tables(meta): (categories, actions, interactions)


def swig_meta_tables(meta, file="<meta>") -> tuple[list, list, list]:
    """SWiG-HOI's swig_v1_meta.json -> (category names, action names, interactions [{id, action_id,
    object_id, frequency, evaluation}]); ids index their table, each (action, object) once."""
    def bad(problem):
        return fail(file, f"SWiG meta file: {problem}")

    if not isinstance(meta, dict):
        raise bad("expected an object with SWIG_CATEGORIES, SWIG_ACTIONS, SWIG_INTERACTIONS")
    tables = []
    for key in ("SWIG_CATEGORIES", "SWIG_ACTIONS"):
        t = meta.get(key)
        if not isinstance(t, list) or not t:
            raise bad(f"field '{key}': expected a non-empty list of {{id, name}}")
        for r, x in enumerate(t):
            if not (isinstance(x, dict) and isinstance(x.get("name"), str)) or x.get("id") not in (None, r):
                raise bad(f"field '{key}[{r}]': expected {{id: {r}, name: string}}")
        tables.append([x["name"] for x in t])
    inter = meta.get("SWIG_INTERACTIONS")
    if not isinstance(inter, list) or not inter:
        raise bad("field 'SWIG_INTERACTIONS': expected a non-empty list")
    out, keys = [], set()
    spec = {"id": len(inter), "action_id": len(tables[1]), "object_id": len(tables[0]), "frequency": 3, "evaluation": 2}
    for r, x in enumerate(inter):
        try:
            if not isinstance(x, dict):
                raise ValueError("expected an object")
            e = {k: as_index(x.get(k, 0 if k == "evaluation" else None), n) for k, n in spec.items()}
        except ValueError as err:
            raise bad(f"field 'SWIG_INTERACTIONS[{r}]': {err}") from None
        if e["id"] != r or (e["action_id"], e["object_id"]) in keys:
            raise bad(f"field 'SWIG_INTERACTIONS[{r}]': id must be {r} and each (action_id, object_id) listed once")
        keys.add((e["action_id"], e["object_id"]))
        out.append(e)
    return tables[0], tables[1], out


def load_swig_meta(path=None) -> dict:
    """swig_v1_meta.json (default: the shared data), validated (swig_meta_tables)."""
    path = path or data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
    meta = read(path, "SWiG meta file")
    swig_meta_tables(meta, path)
    return meta


def parse_swig_gt(anno: Any, meta: dict, name: str = "<anno>", skip_unknown: bool = False) -> SwigGT:
    """THID/SWiG annotation list -> SwigGT. A pair with object_id -1 is left out and counted; one whose
    (action, category) is no interaction is an error, or with ``skip_unknown`` (training) left out and counted."""
    objects, actions, inter = tables = swig_meta_tables(meta)
    mapper = {(x["action_id"], x["object_id"]): x["id"] for x in inter}
    if not isinstance(anno, list):
        raise fail(name, f"expected the SWiG-HOI json: a list of images with file_name, box_annotations, "
                         f"hoi_annotations, got {type(anno).__name__}")
    filenames, sizes, rows, skipped = [], [], [], [0, 0]
    for i, im in enumerate(anno):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            raise fail(name, "missing key or not a string", field_=f"[{i}].file_name")
        filenames.append(im["file_name"])
        sizes.append(None if im.get("width") is None and im.get("height") is None else
                     image_size([im.get("width"), im.get("height")], name, im["file_name"]))
        for r in _swig_rows(im, mapper, len(objects), len(actions), name, skip_unknown):
            if r[1] < 0:
                skipped[-r[1] - 1] += 1
            else:
                rows.append((i,) + r)
    dup = first_duplicate(filenames)
    if dup is not None:
        raise fail(name, "listed twice", dup, field_="file_name")
    img, boxes, cls, act, cat = (list(x) for x in zip(*rows)) if rows else ([], [], [], [], [])
    return SwigGT(name=name, filenames=filenames, index={f: i for i, f in enumerate(filenames)},
                  num_classes=len(inter), eval_ids=np.array([x["id"] for x in inter if x["evaluation"] == 1], np.int64),
                  frequency=np.array([x["frequency"] for x in inter], np.int64), gt_class=np.array(cls, np.int64),
                  gt_image=np.array(img, np.int64), gt_boxes=np.array(boxes, np.float64).reshape(-1, 8),
                  num_no_object=skipped[0], num_unknown=skipped[1], gt_action=np.array(act, np.int64),
                  gt_category=np.array(cat, np.int64), sizes=sizes, tables=tables)


def _swig_rows(im: dict, mapper: dict, num_objects: int, num_actions: int, name, skip_unknown: bool):
    """Per hoi_annotations entry: (human + object box, class, action, category); class -1: no object,
    -2: unknown interaction (skipped)."""
    fn = im["file_name"]
    require(im, ("box_annotations", "hoi_annotations"), name, fn, kind=list)
    raw = im["box_annotations"]
    for r, b in enumerate(raw):
        if not isinstance(b, dict) or "bbox" not in b or "category_id" not in b:
            raise fail(name, "needs 'bbox' [x1, y1, x2, y2] and 'category_id'", fn, field_=f"box_annotations[{r}]")
    boxes = boxes_array([b["bbox"] for b in raw], name, fn, "box_annotations.bbox").tolist()
    cat = int_array([b["category_id"] for b in raw], len(raw), 0, num_objects, name, fn,
                    "box_annotations.category_id").tolist()
    for h, hoi in enumerate(im["hoi_annotations"]):
        if not isinstance(hoi, dict) or not all(k in hoi for k in ("subject_id", "object_id", "action_id")):
            raise fail(name, "needs subject_id, object_id, action_id", fn, field_=f"hoi_annotations[{h}]")
        if is_number(hoi["object_id"]) and hoi["object_id"] == -1:
            yield None, -1, -1, -1
            continue
        o, s, a = (as_index(hoi[k], n, at=(name, fn, None, f"hoi_annotations[{h}].{k}")) for k, n in
                   (("object_id", len(boxes)), ("subject_id", len(boxes)), ("action_id", num_actions)))
        k = mapper.get((a, cat[o]))
        if k is None and not skip_unknown:
            raise fail(name, f"(action_id, object category) = {(a, cat[o])} is not a SWiG-HOI interaction",
                       fn, field_=f"hoi_annotations[{h}]")
        yield boxes[s] + boxes[o], (-2 if k is None else k), a, cat[o]


# --- V-COCO: VSRL + COCO instances, vsrl_eval detections --------------------------------------------------------------

def vsrl_actions(vsrl: Any, vsrl_name: str) -> tuple[list, list, list]:
    """The VSRL list -> (action names, role names, per action (image_id, ann_id, label, role_object_id [N, R]))."""
    if not isinstance(vsrl, list) or not vsrl:
        raise fail(vsrl_name, "expected the official VSRL list (one entry per action)")
    acts, roles, data = [], [], []
    for a, x in enumerate(vsrl):
        if not isinstance(x, dict):
            raise fail(vsrl_name, "expected an object", field_=f"[{a}]")
        for key in ("action_name", "role_name", "image_id", "ann_id", "label", "role_object_id"):
            if key not in x:
                raise fail(vsrl_name, f"missing key '{key}'", field_=f"[{a}]")
        name, rn = x["action_name"], x["role_name"]
        if not isinstance(name, str) or name in acts:
            raise fail(vsrl_name, f"must be a string naming each action once, got {name!r}",
                       field_=f"[{a}].action_name")
        if not isinstance(rn, list) or not rn or rn[0] != "agent" or len(rn) > 3 or \
                not all(isinstance(r, str) for r in rn) or first_duplicate(rn) is not None:
            raise fail(vsrl_name, "must be ['agent', ...] with at most 2 other distinct roles",
                       field_=f"{name}.role_name")
        img, ann, lab, roi = (_int_vector(x[k], where(vsrl_name, field_=f"{name}.{k}"))
                              for k in ("image_id", "ann_id", "label", "role_object_id"))
        if roi.size % len(rn) or not (img.size == ann.size == lab.size == roi.size // len(rn)):
            raise fail(vsrl_name, "image_id, ann_id, label and role_object_id (len(role_name) x N) have "
                                  "different lengths", field_=name)
        roi = roi.reshape(len(rn), -1).T
        if not np.isin(lab, (0, 1)).all():
            raise fail(vsrl_name, f"must hold 0 or 1, got {int(lab[~np.isin(lab, (0, 1))][0])}",
                       field_=f"{name}.label")
        dup = first_duplicate(ann.tolist())
        if dup is not None:
            raise fail(vsrl_name, f"lists person {dup} twice", field_=f"{name}.ann_id")
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
        raise FormatError(f"{where}: expected integers, got {float(a[bad][0]) if bad.any() else 'a boolean'!r}")
    return a.astype(np.int64)


def coco_index(coco: Any, image_ids: list, coco_name: str) -> tuple[Any, dict, dict]:
    """COCO instances -> (person category id, {image id: (w, h)}, {image id: [annotations]}) of image_ids."""
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list) or \
            not isinstance(coco.get("images"), list):
        raise fail(coco_name, "expected a COCO instances JSON with 'images' and 'annotations' (lists)")
    cats = coco.get("categories") if isinstance(coco.get("categories"), list) else []
    persons = [c.get("id") for c in cats if isinstance(c, dict) and c.get("name") == "person"]
    person_cat = persons[-1] if persons else 1          # the last "person" entry counts
    wanted, sizes = set(image_ids), {}
    for im in coco["images"]:
        if isinstance(im, dict) and is_number(im.get("id")) and im["id"] in wanted:
            w, h = im.get("width"), im.get("height")
            if not (is_number(w) and is_number(h)) or check_numbers([[w, h]], coco_name, im["id"], "width/height",
                                                                    at=lambda r: (im["id"], None)).min() <= 0:
                raise fail(coco_name, f"must be positive numbers, got {w!r}, {h!r}", im["id"], field_="width/height")
            if int(im["id"]) in sizes:
                raise fail(coco_name, "listed twice in 'images'", im["id"])
            sizes[int(im["id"])] = (float(w), float(h))
    anns_by_img: dict = {i: [] for i in image_ids}
    for k, an in enumerate(coco["annotations"]):
        if not isinstance(an, dict):
            raise fail(coco_name, "expected an object", field_=f"annotations[{k}]")
        i = as_index(an.get("image_id"), at=(coco_name, None, None, f"annotations[{k}].image_id"))
        if i in anns_by_img:
            anns_by_img[i].append(an)
    return person_cat, sizes, anns_by_img


def coco_boxes(anns: list, size: tuple, person_cat, coco_name: str, image_id: int) -> tuple[list, list, list]:
    """One image's COCO annotations -> (boxes, ids, is-person flags) of the kept ones, as vsrl_eval: [x, y,
    x + max(0, w - 1), y + max(0, h - 1)] clipped; ignored, zero-area and extent-less ones dropped."""
    width, height = size
    boxes, ids, is_person = [], [], []
    for an in anns:
        try:
            if an.get("ignore", 0) == 1:
                continue
            b = an["bbox"]
            if not (isinstance(b, list) and len(b) == 4 and all(map(is_number, b))) or not is_number(an["area"]):
                raise ValueError
            for v, dtype, key in ((b, np.float32, "bbox"), ([an["area"]], np.float64, "area")):    # area: > 0 only
                check_numbers(np.array([v]), coco_name, image_id, f"annotation {an['id']}.{key}", dtype,
                              at=lambda r: (image_id, None))
            as_index(an["id"])
            x, y, w, h = (float(v) for v in b)
            x1, x2 = (min(width - 1.0, max(0.0, v)) for v in (x, x + max(0.0, w - 1.0)))
            y1, y2 = (min(height - 1.0, max(0.0, v)) for v in (y, y + max(0.0, h - 1.0)))
            if an["area"] > 0 and x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                ids.append(int(an["id"]))
                is_person.append(an["category_id"] == person_cat)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError):
            raise fail(coco_name, f"annotation {an.get('id')}: missing or malformed field (needs id, "
                                  f"bbox [x, y, w, h], area, category_id)", image_id) from None
    return boxes, ids, is_person


@dataclass
class VCOCODets:
    """Detections in vsrl_eval's layout, in file order (NaN = not predicted)."""
    img: np.ndarray         # int64[D] position of the image in gt.image_ids
    person: np.ndarray      # float32[D, 4]
    agent: np.ndarray       # float32[D, A] agent scores
    role: np.ndarray        # float32[D, R, 5] role box + score of the R action-roles (vcoco_role_keys)


def vcoco_role_keys(gt) -> list:
    """[(action index, role index)] of every action-role, vsrl_eval order."""
    return [(a, r) for a in range(len(gt.actions)) for r in range(len(gt.roles[a]) - 1)]


def load_vcoco_dets(obj: Any, gt, src: str):
    """vsrl_eval detection list -> (VCOCODets, unknown keys, count); missing / null = not predicted (NaN).
    Errors name a detection ``image 'IMAGE_ID' row K`` (K: its place in the file)."""
    if not isinstance(obj, list):
        raise fail(src, "expected a JSON list of detections {image_id, person_box, <action>_agent, <action>_<role>}")
    pos = {i: k for k, i in enumerate(gt.image_ids)}
    img, person = np.empty(len(obj), dtype=np.int64), []
    for k, d in enumerate(obj):
        i = d.get("image_id") if isinstance(d, dict) else None
        if not is_number(i) or not math.isfinite(i) or i != int(i):
            raise fail(src, "expected an object with an integer image_id", row=k, field_="image_id")
        if int(i) not in pos:
            raise fail(src, "image not in the V-COCO ground truth", int(i), k, "image_id")
        img[k] = pos[int(i)]
        pb = d.get("person_box")
        if not (isinstance(pb, list) and len(pb) == 4 and all(map(is_number, pb))):
            raise fail(src, "expected 4 numbers [x1, y1, x2, y2]", int(i), k, "person_box")
        person.append(pb)
    person = check_numbers(np.array(person, np.float64).reshape(-1, 4), src, None, "person_box", box=True,
                           at=lambda k: (gt.image_ids[int(img[k])], k))         # vsrl_eval computes in float32
    agent_keys = [f"{name}_agent" for name in gt.actions]
    role_keys = [f"{gt.actions[a]}_{gt.roles[a][r + 1]}" for a, r in vcoco_role_keys(gt)]
    agent = np.zeros((len(obj), len(agent_keys)), dtype=np.float32)
    role = np.zeros((len(obj), len(role_keys), 5), dtype=np.float32)
    for out, keys, width in ((agent, agent_keys, 1), (role, role_keys, 5)):
        for q, key in enumerate(keys):
            out[:, q] = _vcoco_column(obj, key, width, gt, img, src)
    unknown = set(chain.from_iterable(d.keys() for d in obj[:1000]))     # a sample is enough to warn
    dets = VCOCODets(img=img, person=person.astype(np.float32), agent=agent, role=role)
    return dets, sorted(unknown - {"image_id", "person_box", *agent_keys, *role_keys}), len(obj)


_SCORE_TYPES = {float, int, type(None)}


def _vcoco_column(obj: list, key: str, width: int, gt, img: np.ndarray, src: str) -> np.ndarray:
    """obj[k][key] -> float64[D] scores (width 1) or float64[D, 5] role box + score, missing / null -> NaN.
    Fast path: one type check and one conversion; the bad value is looked for only when they fail."""
    vals, arr = [d.get(key) for d in obj], None
    if width == 1 and set(map(type, vals)) <= _SCORE_TYPES:
        arr = np.array(vals, dtype=np.float64).reshape(len(obj))
    elif width == 5 and set(map(type, vals)) <= {list, type(None)}:
        lists = [v for v in vals if v is not None]
        if set(map(len, lists)) <= {5} and set(map(type, chain.from_iterable(lists))) <= _SCORE_TYPES:
            arr = np.array([[np.nan] * 5 if v is None else v for v in vals], dtype=np.float64).reshape(len(obj), 5)
    if arr is not None:     # float32, as vsrl_eval; NaN = not predicted: a score or a whole box, no other NaN
        for cols, box in (([0, 1, 2, 3], True), ([4], False)) if width == 5 else (([0], False),):
            check_numbers(arr.reshape(len(obj), -1)[:, cols], src, None, key, box=box, nan_ok=True,
                          at=lambda k: (gt.image_ids[int(img[k])], k))
        return arr

    def bad_score(v):
        return not (v is None or type(v) in (float, int))

    k = next(k for k, v in enumerate(vals) if (bad_score(v) if width == 1 else v is not None and not (
        type(v) is list and len(v) == 5 and not any(map(bad_score, v)))))
    raise fail(src, "expected a score (a number, NaN or null = not predicted)" if width == 1 else
               "expected [x1, y1, x2, y2, score] (numbers or null; NaN/null score = not predicted)",
               gt.image_ids[int(img[k])], k, key)


@dataclass
class VcocoPairs:
    """fredzzhang/vcoco's ``instances_vcoco_*.json`` (:func:`parse_vcoco_pairs`); objects COCO-80 (the
    file's index - 1: it counts 'background' as 0)."""
    filenames: list
    classes: list                   # K action-role names
    objects: list                   # 80 object names
    image_ids: list | None          # COCO image ids (the file's ``images``)
    rows: list                      # per image {boxes_h, boxes_o [P, 4], object, hoi [P]}
    hoi_object: list                # per class the COCO-80 labels it may take
    prompts: list | None


def parse_vcoco_pairs(d: Any, name) -> VcocoPairs:
    """Keys: ``annotations`` ({file_name, boxes_h, boxes_o, actions, objects} each), ``classes``, ``objects``
    (81); optional ``images``, ``action_to_object`` (per class, of the 81; absent: every object), ``prompts``."""
    if not isinstance(d, dict):
        raise fail(name, "expected a JSON object with key 'annotations'")
    require(d, ("annotations", "classes", "objects"), name, kind=list)
    anns = d["annotations"]
    classes, objects81 = name_list(d["classes"], name, "classes"), name_list(d["objects"], name, "objects")
    K, O81 = len(classes), len(objects81)
    ids, a2o = d.get("images"), d.get("action_to_object")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(anns)):
        raise fail(name, f"expected a list of {len(anns)} image ids, one per annotation", field_="images")
    ids = as_index_list(ids, unique=True, at=(name, None, None, "images")) if ids is not None else None
    files, rows = [], []
    for j, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("file_name"), str):
            raise fail(name, "missing key or not a string", field_=f"annotations[{j}].file_name")
        img = a["file_name"]
        require(a, ("boxes_h", "boxes_o", "actions", "objects"), name, img)
        bh, bo = (boxes_array(a[k], name, img, k) for k in ("boxes_h", "boxes_o"))
        if len(bo) != len(bh):
            raise fail(name, f"{len(bo)} object boxes for {len(bh)} human boxes", img, field_="boxes_o")
        rows.append({"boxes_h": bh, "boxes_o": bo, "hoi": int_array(a["actions"], len(bh), 0, K, name, img, "actions"),
                     "object": int_array(a["objects"], len(bh), 1, O81, name, img, "objects") - 1})
        files.append(img)
    name_list(files, name, "annotations[].file_name")
    if a2o is not None and (not isinstance(a2o, list) or len(a2o) != K):
        raise fail(name, f"expected one list of object indices per class ({K})", field_="action_to_object")
    hoi_object = [list(range(O81 - 1))] * K if a2o is None else []
    for k, lst in enumerate(a2o or []):
        at = (name, None, None, f"action_to_object[{k}]")
        hoi_object.append(sorted({o - 1 for o in as_index_list(lst, O81, at=at) if o > 0}))
    return VcocoPairs(filenames=files, classes=classes, objects=objects81[1:], image_ids=ids, rows=rows,
                      hoi_object=hoi_object, prompts=prompts_list(d.get("prompts"), K, name))


# --- Detection files: per image {file_name: {boxes, scores, labels}} and COCO results ---------------------------------

def image_detections(e: Any, file, image, num_labels: Optional[int] = None) -> tuple:
    """One image's {boxes, scores, labels} -> (boxes float64[N, 4] (:func:`boxes_array`), scores float64[N]
    finite within float32, labels int64[N] in [0, num_labels))."""
    if not isinstance(e, dict):
        raise fail(file, "expected {boxes, scores, labels}", image)
    require(e, ("boxes", "scores", "labels"), file, image)
    boxes = boxes_array(e["boxes"], file, image, "boxes")
    n = len(boxes)
    if not (isinstance(e["scores"], list) and len(e["scores"]) == n and all(map(is_number, e["scores"]))):
        raise fail(file, f"expected {n} numbers", image, field_="scores")
    scores = check_numbers(e["scores"], file, image, "scores").reshape(n)        # the box AP: float32
    return boxes, scores, int_array(e["labels"], n, 0, num_labels or 2 ** 62, file, image, "labels")


def coco_result(e: Any, r: int, file, names: dict, labels: dict) -> tuple:
    """Entry r of a COCO results list -> (file name, [x, y, w, h], score, label); names: {image_id: file name},
    labels: {category_id: label}. The box is finite, w, h >= 0, x + w and y + h within float32."""
    if not isinstance(e, dict):
        raise fail(file, "expected an object {image_id, category_id, bbox, score}", row=r)
    require(e, ("image_id", "category_id", "bbox", "score"), file, row=r)
    iid, cid, b, s = e["image_id"], e["category_id"], e["bbox"], e["score"]
    if not (type(iid) is int and iid in names):
        raise fail(file, f"unknown image id {iid!r}", row=r, field_="image_id")
    img = names[iid]
    if not (type(cid) is int and cid in labels):
        raise fail(file, f"{cid!r} is not a category id of the object set", img, r, "category_id")
    if not (isinstance(b, list) and len(b) == 4 and all(map(is_number, b))):
        raise fail(file, f"expected [x, y, w, h] (4 numbers), got {b!r}", img, r, "bbox")
    x, y, w, h = (float(v) for v in b)
    check_numbers(np.array([[x, y, x + w, y + h]]), file, img, "bbox", at=lambda _: (img, r))    # the AP: float32
    if w < 0 or h < 0:
        raise fail(file, f"{b!r} has a negative width/height", img, r, "bbox")
    if not is_number(s):
        raise fail(file, f"{s!r} is not a finite number", img, r, "score")
    check_numbers(np.array([s]), file, img, "score", at=lambda _: (img, r))
    return img, [x, y, w, h], float(s), labels[cid]
