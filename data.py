"""Datasets, class spaces, detections and pair bounding.

Everything in this file works in ONE box convention: float ``[x1, y1, x2, y2]`` in the pixel
frame of the annotation file (HICO-DET: the raw 1-based inclusive MATLAB values, never
shifted, frame ``hico1``; V-COCO: fredzzhang's continuous COCO-derived values; SWiG-HOI: the
file's values; synthetic world (synthetic.py): continuous pixel edges; frame ``continuous``
for all three, see common.BOX_FRAMES). A dataset names its frame in ``ds.box_frame``.
Detections and predictions are written in the same frame; a detection file in the other frame
is converted when read (``load_detections(..., frame=, into=)``).

Public API (see the README section "Data" for the formats):

- ``ClassSpace``                      the interaction class space (stored in checkpoints)
- ``HICODet``, ``VCOCO``, ``SWiGHOI``   ``ds[i] -> (PIL.Image RGB, target dict)``
- ``collate(batch)``
- ``load_detections``, ``save_detections``, ``gt_detections``, ``select_boxes``,
  ``convert_box_frame``
- ``DataError`` (a ValueError), ``ImageError`` (DataError + FileNotFoundError)
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from common import BOX_FRAMES, ZERO_SHOT_SPLITS, atomic_write_text, data_root, read_json
from formats import (
    FLOAT32_MAX,
    as_index,
    as_index_list,
    first_duplicate,
    iou_continuous,
    iou_inclusive,
    is_number,
    swig_meta_tables,
)

__all__ = [
    "ClassSpace", "HICODet", "VCOCO", "SWiGHOI", "collate", "load_detections",
    "save_detections", "gt_detections", "select_boxes", "convert_box_frame",
    "DataError", "ImageError", "COCO80_NAMES", "COCO80_TO_COCO91",
]


# ---------------------------------------------------------------------------------------
# constants and helpers
# ---------------------------------------------------------------------------------------

#: COCO-80 object names in the order used by fredzzhang/hicodet (``objects``), underscores.
COCO80_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic_light", "fire_hydrant", "stop_sign", "parking_meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports_ball",
    "kite", "baseball_bat", "baseball_glove", "skateboard", "surfboard", "tennis_racket",
    "bottle", "wine_glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot_dog", "pizza", "donut", "cake", "chair",
    "couch", "potted_plant", "bed", "dining_table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell_phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy_bear", "hair_drier",
    "toothbrush",
]

#: COCO category id (the 91-id space of COCO results files) of each COCO-80 index.
#: Note: shared/data/hicodet/coco91tohico80.json maps COCO ids to the ALPHABETICAL HICO
#: object order (person -> 49), not to COCO-80; we therefore use this standard table.
COCO80_TO_COCO91 = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
COCO91_TO_COCO80 = {cid: i for i, cid in enumerate(COCO80_TO_COCO91)}

class DataError(ValueError):
    """Bad annotation / detection input. The message names the file, the image, the field."""


class ImageError(DataError, FileNotFoundError):
    """An image file is missing or unreadable (message names the file and dataset index)."""


def _err(file, image, field_, msg) -> DataError:
    return DataError(f"{file}: image {image!r}: field {field_!r}: {msg}")


def _prompts_field(d: dict, K: int, fname):
    """The annotation file's optional `prompts` list (K strings), or None when absent."""
    prompts = d.get("prompts")
    if prompts is not None and not (isinstance(prompts, list) and len(prompts) == K
                                    and all(isinstance(p, str) for p in prompts)):
        raise _err(fname, "-", "prompts", f"expected {K} strings")
    return prompts


def _pair_boxes(a: dict, fname, img):
    """The validated human and object boxes [P, 4] of one image's annotation entry."""
    bh = _boxes_array(a["boxes_h"], fname, img, "boxes_h")
    bo = _boxes_array(a["boxes_o"], fname, img, "boxes_o")
    if len(bo) != len(bh):
        raise _err(fname, img, "boxes_o", f"{len(bo)} object boxes for {len(bh)} human boxes")
    return bh, bo


def _boxes_array(value, file, image, field_, allow_empty=True) -> np.ndarray:
    """Validate a list of [x1, y1, x2, y2] boxes -> float64 array [N, 4]."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise _err(file, image, field_, f"expected a list of boxes, got {type(value).__name__}")
    if len(value) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _err(file, image, field_, "boxes must be lists of 4 numbers") from None
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise _err(file, image, field_, f"boxes must have shape [N, 4], got {list(arr.shape)}")
    ok = np.isfinite(arr) & (np.abs(arr) <= FLOAT32_MAX)    # stored as float32 downstream
    if not ok.all():
        r = int(np.nonzero(~ok.all(1))[0][0])
        raise _err(file, image, f"{field_}[{r}]", f"non-finite box or beyond float32's range {arr[r].tolist()}")
    bad = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if bad.any():
        r = int(np.nonzero(bad)[0][0])
        raise _err(file, image, f"{field_}[{r}]", f"box {arr[r].tolist()} has x2<x1 or y2<y1")
    return arr


def _int_array(value, n, lo, hi, file, image, field_) -> np.ndarray:
    """Validate a list of n integer indices in [lo, hi) -> int64 array [n]: integral numbers
    only (5.0 is 5; 5.5, NaN, a string or a nested list are refused), never wrapping around."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise _err(file, image, field_, f"expected a list of integers, got {type(value).__name__}")
    if len(value) != n:
        raise _err(file, image, field_, f"has {len(value)} entries, expected {n}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or not (np.isfinite(arr) & (arr == np.floor(arr))).all():
        raise _err(file, image, field_, "expected integer indices")
    bad = (arr < lo) | (arr >= hi)
    if bad.any():
        r = int(np.nonzero(bad)[0][0])
        raise _err(file, image, f"{field_}[{r}]", f"index {arr[r]:.0f} out of range [{lo}, {hi})")
    return arr.astype(np.int64)


def _require(d: dict, key, file, image="-", kind=list):
    if not isinstance(d, dict) or key not in d:
        raise _err(file, image, key, "missing key")
    v = d[key]
    if kind is not None and not isinstance(v, kind):
        raise _err(file, image, key, f"expected {kind.__name__}, got {type(v).__name__}")
    return v


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------
# class space
# ---------------------------------------------------------------------------------------

@dataclass
class ClassSpace:
    """Interaction class space: K classes over O object labels and V verbs.

    Built by the datasets, consumed by the model, stored in checkpoints as a plain dict
    (``dataclasses.asdict(cs)`` / ``cs.asdict()``; ``ClassSpace.from_dict(d)`` rebuilds).
    """
    name: str
    prompts: list  # list[str], K prompts in class order
    object_names: list  # list[str], O names of the object label space
    hoi_object: list  # list[list[int]], for each class the object labels it may take
    hoi_verb: list  # list[int], verb index of each class (-1 if none)
    verb_names: list  # list[str]
    person_label: int = 0
    rare: list = field(default_factory=list)  # list[int]
    unseen: list = field(default_factory=list)  # list[int]

    def __post_init__(self):
        K, O, V = len(self.prompts), len(self.object_names), len(self.verb_names)
        self.prompts = [str(p) for p in self.prompts]
        self.object_names = [str(p) for p in self.object_names]
        self.verb_names = [str(p) for p in self.verb_names]
        self.hoi_object = [[int(o) for o in (objs if isinstance(objs, (list, tuple)) else [objs])]
                           for objs in self.hoi_object]
        self.hoi_verb = [int(v) for v in self.hoi_verb]
        self.person_label = int(self.person_label)
        self.rare = sorted(int(k) for k in self.rare)
        self.unseen = sorted(int(k) for k in self.unseen)
        where = f"ClassSpace {self.name!r}"
        if len(self.hoi_object) != K or len(self.hoi_verb) != K:
            raise ValueError(f"{where}: {K} prompts but {len(self.hoi_object)} hoi_object and "
                             f"{len(self.hoi_verb)} hoi_verb entries")
        for k, objs in enumerate(self.hoi_object):
            if any(o < 0 or o >= O for o in objs):
                raise ValueError(f"{where}: hoi_object[{k}]={objs} out of range [0, {O})")
        for k, v in enumerate(self.hoi_verb):
            if v < -1 or v >= V:
                raise ValueError(f"{where}: hoi_verb[{k}]={v} out of range [-1, {V})")
        if not 0 <= self.person_label < O:
            raise ValueError(f"{where}: person_label {self.person_label} out of range [0, {O})")
        for nm in ("rare", "unseen"):
            bad = [k for k in getattr(self, nm) if k < 0 or k >= K]
            if bad:
                raise ValueError(f"{where}: {nm} index {bad[0]} out of range [0, {K})")

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def num_objects(self) -> int:
        return len(self.object_names)

    def object_mask(self) -> torch.Tensor:
        """BoolTensor[K, O]: True where class k may take object label o."""
        m = torch.zeros(self.num_classes, self.num_objects, dtype=torch.bool)
        for k, objs in enumerate(self.hoi_object):
            m[k, objs] = True
        return m

    def asdict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassSpace":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ClassSpace.from_dict: unknown keys {sorted(unknown)}")
        return cls(**{k: d[k] for k in names if k in d})


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------

class _HOIDataset(torch.utils.data.Dataset):
    """Common part of the three datasets.

    Subclasses fill ``self._files`` (file name of every image of the annotation file),
    ``self._sizes`` ((w, h) or None when the file has no size), ``self._ann`` (per image a
    dict of numpy arrays boxes_h [P,4], boxes_o [P,4], object [P], hoi [P], verb [P]) and
    ``self.indices`` (the annotation-file indices this dataset exposes, in order).
    """

    dataset_name = "hoi"
    box_frame = "continuous"  # the annotation file's box frame (common.BOX_FRAMES)

    def __init__(self, image_root, anno_file):
        self.image_root = Path(image_root)
        self.anno_file = Path(anno_file)
        self._files: list = []
        self._sizes: list = []
        self._ann: list = []
        self.indices: list = []
        self._size_warned = False

    # -- sizes / names ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def filenames(self) -> list:
        """File names of the exposed images, in dataset order."""
        return [self._files[j] for j in self.indices]

    def _check_index(self, i) -> int:
        n = len(self.indices)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{self.dataset_name}: index must be an int, got {type(i).__name__}")
        if i < -n or i >= n:
            raise IndexError(f"{self.dataset_name}: index {i} out of range for {n} images")
        return int(i) % n

    def image_path(self, i) -> Path:
        return self.image_root / self._files[self.indices[self._check_index(i)]]

    def _open(self, i, header_only=False):
        path = self.image_path(i)
        if not path.is_file():
            raise ImageError(f"{self.dataset_name}: image file {str(path)!r} not found "
                             f"(dataset index {i}, annotation file {self.anno_file})")
        try:
            img = Image.open(path)
            if not header_only:
                img = img.convert("RGB")
            return img
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{self.dataset_name}: cannot read image {str(path)!r} "
                             f"(dataset index {i}, annotation file {self.anno_file}): {e}") from None

    def image_size(self, i) -> tuple:
        """(w, h) of image i: from the annotation file when it has sizes, else the header."""
        j = self.indices[self._check_index(i)]
        if self._sizes[j] is not None:
            return self._sizes[j]
        with self._open(i, header_only=True) as img:
            return tuple(int(s) for s in img.size)

    # -- items -----------------------------------------------------------------------
    def target(self, i, size=None) -> dict:
        """Target dict of image i without decoding the image (see module docstring)."""
        i = self._check_index(i)
        j = self.indices[i]
        a = self._ann[j]
        if size is None:
            size = self.image_size(i)
        return {
            "filename": self._files[j],
            "index": j,  # index in the annotation file
            "size": (int(size[0]), int(size[1])),
            "boxes_h": torch.as_tensor(a["boxes_h"], dtype=torch.float32).reshape(-1, 4),  # [P, 4]
            "boxes_o": torch.as_tensor(a["boxes_o"], dtype=torch.float32).reshape(-1, 4),  # [P, 4]
            "object": torch.as_tensor(a["object"], dtype=torch.long),  # [P]
            "hoi": torch.as_tensor(a["hoi"], dtype=torch.long),  # [P]
            "verb": torch.as_tensor(a["verb"], dtype=torch.long),  # [P]
        }

    def __getitem__(self, i):
        i = self._check_index(i)
        img = self._open(i)
        j = self.indices[i]
        size = self._sizes[j]
        real = (int(img.size[0]), int(img.size[1]))
        if size is None:
            size = real
        elif tuple(size) != real and not self._size_warned:
            self._size_warned = True
            warnings.warn(f"{self.dataset_name}: {self.anno_file}: image {self._files[j]!r}: "
                          f"field 'size': file says {tuple(size)}, image is {real}; boxes are "
                          f"kept in the file's frame")
        return img, self.target(i, size=size)

    def num_pairs(self) -> int:
        """Number of (pair, class) rows over the exposed images."""
        return int(sum(len(self._ann[j]["hoi"]) for j in self.indices))

    def class_counts(self) -> np.ndarray:
        """int64[K]: (pair, class) rows per class over the exposed images."""
        K = self.class_space().num_classes
        c = np.zeros(K, dtype=np.int64)
        for j in self.indices:
            c += np.bincount(self._ann[j]["hoi"], minlength=K)
        return c

    def class_space(self) -> ClassSpace:
        return self._class_space


def _few_shot_indices(labels: Sequence[np.ndarray], num_classes: int, k: int, seed: int) -> list:
    """Few-shot image subset (positions into ``labels``), see README "Few-shot rule".

    1. A generator ``np.random.default_rng(seed)`` draws a random image order, then a random
       class order; classes are then stably sorted by their total number of (pair, class)
       rows, rarest first (ties keep the random order).
    2. For each class c in that order, while c has fewer than k rows in the kept images, the
       next not-yet-kept image containing c (in the random image order) is kept; all of its
       rows count towards every class.
    So every class with >= k rows ends with >= k (possibly more, other classes' images bring
    extra rows) and a class with fewer than k rows keeps all of its images.
    """
    if k < 1:
        raise ValueError(f"few_shot must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    order = rng.permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    per_image = [np.bincount(lab, minlength=num_classes) for lab in labels]
    total = np.sum(per_image, axis=0) if n else np.zeros(num_classes, dtype=np.int64)
    images_of = [[] for _ in range(num_classes)]
    for i, cnt in enumerate(per_image):
        for c in np.nonzero(cnt)[0]:
            images_of[c].append(i)
    class_order = rng.permutation(num_classes)
    class_order = class_order[np.argsort(total[class_order], kind="stable")]
    counts = np.zeros(num_classes, dtype=np.int64)
    kept = np.zeros(n, dtype=bool)
    for c in class_order:
        for i in sorted(images_of[c], key=lambda x: rank[x]):
            if counts[c] >= k:
                break
            if kept[i]:
                continue
            kept[i] = True
            counts += per_image[i]
    return [int(i) for i in np.nonzero(kept)[0]]


def _hico_prompts(objects, verbs, corr) -> list:
    """HICO-DET prompts from shared/data/hicodet/derived/hico_text_label.json.

    That file's keys are [verb_index (117 verbs), coco80_object_index]; we look each class up
    by its (verb, object) from ``correspondence``. Classes it lacks (or a missing file) get
    "a photo of a person <verb> a/an <object>".
    """
    table = {}
    f = data_root() / "hicodet" / "derived" / "hico_text_label.json"
    if list(objects) == COCO80_NAMES and len(verbs) == 117 and f.is_file():
        for (v, o), text in read_json(f, "annotation file", DataError)["hico_text_label"]:
            table[(int(v), int(o))] = text
    out = []
    for _, o, v in corr:
        if (v, o) in table:
            out.append(table[(v, o)])
        else:
            vb, ob = verbs[v].replace("_", " "), objects[o].replace("_", " ")
            out.append(f"a photo of a person {vb} {_article(ob)} {ob}")
    return out


def _hico_correspondence(corr_raw: list, O: int, V: int, fname) -> list:
    """The file's ``correspondence`` -> [(hoi, object, verb)] indexed by hoi (each class once)."""
    K = len(corr_raw)
    corr = [None] * K
    for r, c in enumerate(corr_raw):
        if not (isinstance(c, (list, tuple)) and len(c) == 3):
            raise _err(fname, "-", f"correspondence[{r}]", "expected [hoi, object, verb]")
        try:
            h, o, v = as_index(c[0], K), as_index(c[1], O), as_index(c[2], V)
        except ValueError as e:
            raise _err(fname, "-", f"correspondence[{r}]", f"bad entry {c} (K={K}, O={O}, V={V}): {e}") from None
        if corr[h] is not None:
            raise _err(fname, "-", f"correspondence[{r}]", f"class {h} listed twice")
        corr[h] = (h, o, v)
    return corr


def _hico_entry(a, fname, img, kov: tuple, corr_o: np.ndarray, corr_v: np.ndarray) -> dict:
    """One image's annotation entry -> {boxes_h, boxes_o [P, 4], object, hoi, verb Long[P]},
    validated: classes in [0, K), objects in [0, O), verbs in [0, V), each row's (object, verb)
    the class's (corr_o, corr_v)."""
    K, O, V = kov
    if not isinstance(a, dict):
        raise _err(fname, img, "annotation", "expected an object")
    for key in ("boxes_h", "boxes_o", "hoi", "object", "verb"):
        if key not in a:
            raise _err(fname, img, key, "missing key")
    bh, bo = _pair_boxes(a, fname, img)
    P = len(bh)
    hoi = _int_array(a["hoi"], P, 0, K, fname, img, "hoi")
    obj = _int_array(a["object"], P, 0, O, fname, img, "object")
    verb = _int_array(a["verb"], P, 0, V, fname, img, "verb")
    bad = (corr_o[hoi] != obj) | (corr_v[hoi] != verb)
    if bad.any():
        r = int(np.nonzero(bad)[0][0])
        raise _err(fname, img, f"hoi[{r}]", f"class {int(hoi[r])} is (object "
                   f"{int(corr_o[hoi[r]])}, verb {int(corr_v[hoi[r]])}) but the row says "
                   f"(object {int(obj[r])}, verb {int(verb[r])})")
    return {"boxes_h": bh, "boxes_o": bo, "object": obj, "hoi": hoi, "verb": verb}


def _hico_frame(d: dict, frame, fname) -> str:
    """The box frame of a HICO-DET-format file: ``frame`` when given, else the file's
    ``box_frame``, else continuous for a synthetic world written before that key, else hico1."""
    if frame is None:
        frame = d.get("box_frame", "continuous" if d.get("name") == "synthetic" else "hico1")
    if frame not in BOX_FRAMES:
        raise _err(fname, "-", "box_frame", f"{frame!r} is not one of {sorted(BOX_FRAMES)}")
    return frame


#: min(IoU_h, IoU_o) from which two rows of an image are the same (human, object) pair
SAME_PAIR_IOU = 0.5


def _zero_shot_rows(a: dict, unseen: np.ndarray, rule: str, frame: str) -> np.ndarray:
    """Bool[P]: the rows of one image's annotation the zero-shot training filter removes.

    "label": the rows of unseen classes. "pair" (GEN-VLKT / HOICLIP ``skip_pair``): also every
    row of a pair that carries an unseen label. A pair is what those codes index as one
    (subject, object): in fredzzhang's files each (pair, class) row has its own boxes, drawn
    per class by the annotators (none of the 33,405 test rows repeats another's boxes, yet 58 %
    share a person and an object with another row), so two rows are the same pair when their
    objects have the same label and min(IoU_h, IoU_o) >= SAME_PAIR_IOU (the protocols' IoU of
    the frame; the same threshold as the training-label rule). Exact box equality would leave
    the "pair" rule equal to the "label" rule on those files.
    """
    u = unseen[a["hoi"]]
    if rule == "label" or not u.any() or u.all():
        return u
    iou = iou_inclusive if BOX_FRAMES[frame] == 1 else iou_continuous
    i, j = (x.reshape(-1) for x in np.meshgrid(np.arange(len(u)), np.nonzero(u)[0], indexing="ij"))
    same = (np.minimum(iou(a["boxes_h"][i], a["boxes_h"][j]), iou(a["boxes_o"][i], a["boxes_o"][j]))
            >= SAME_PAIR_IOU) & (a["object"][i] == a["object"][j])
    return u | same.reshape(len(u), -1).any(1)


def _names(v: list, fname, field_: str) -> list:
    """A list of names (filenames, objects, verbs, classes): strings, each once."""
    bad = next((r for r, x in enumerate(v) if not isinstance(x, str)), None)
    if bad is not None:
        raise _err(fname, "-", f"{field_}[{bad}]", f"expected a string, got {v[bad]!r}")
    dup = first_duplicate(v)
    if dup is not None:
        raise _err(fname, "-", field_, f"{dup!r} listed twice")
    return list(v)


def _class_list(d: dict, key: str, K: int, fname) -> list:
    """The optional list of class indices d[key] (rare, non_rare), each in [0, K) once."""
    try:
        return as_index_list(d.get(key) or [], K, unique=True)
    except ValueError as e:
        raise _err(fname, "-", key, str(e)) from None


def _image_size(s, fname, img) -> tuple:
    """A ``size`` entry [w, h] (positive integers) -> (int w, int h)."""
    try:
        if not (isinstance(s, (list, tuple)) and len(s) == 2):
            raise ValueError("expected 2 values")
        return (as_index(s[0], lo=1), as_index(s[1], lo=1))
    except ValueError:
        raise _err(fname, img, "size", f"expected [w, h] (positive integers), got {s!r}") from None


class HICODet(_HOIDataset):
    """HICO-DET in the fredzzhang/hicodet JSON format (also the synthetic world's format).

    Keys: ``annotation`` (per image {boxes_h, boxes_o, hoi, object, verb}, one row per
    (pair, class)), ``filenames``, ``empty``, ``objects``, ``verbs``, ``correspondence``
    ([hoi, object, verb] for every class), ``size`` ([w, h] per image), ``rare``,
    ``non_rare``; optional ``prompts`` (K strings), ``zero_shot`` ({split: [hoi]}) and
    ``name``. ``empty``/``size``/``rare``/``non_rare`` may be absent (older files).
    ``ds.raw`` is the file as read (unfiltered), e.g. for ``eval.evaluate_hico``.

    zero_shot: None, a split name (rf-uc | nf-uc | uo | uv, or the long names rare_first ...,
        or any key of the file's ``zero_shot`` dict) or an explicit list of class indices.
        Training filter (``zero_shot_rule``, see ``_zero_shot_rows``): "pair" (default, the
        GEN-VLKT / HOICLIP ``skip_pair`` rule) removes every pair that carries an unseen label
        with ALL its labels, "label" only the unseen rows; images left without any row are
        dropped; ``class_space().unseen`` lists the unseen classes.
    few_shot: None or k >= 1, see ``_few_shot_indices`` (applied after the zero-shot filter).
    skip_empty: drop the images the file lists in ``empty`` (no visible pair; UPT leaves them
        out of training) and every image without any row (implied by zero_shot).
    frame: the boxes' frame (common.BOX_FRAMES); default: the file's ``box_frame`` key, else
        ``continuous`` for a synthetic world (``name`` "synthetic", written before that key
        existed), else ``hico1`` (the HICO-DET files).
    """

    dataset_name = "HICODet"

    def __init__(self, image_root, anno_file, zero_shot=None, few_shot=None, seed=0,
                 skip_empty=False, zero_shot_rule="pair", frame=None):
        super().__init__(image_root, anno_file)
        fname = self.anno_file
        d = read_json(fname, "annotation file", DataError)
        if not isinstance(d, dict):
            raise DataError(f"{fname}: expected a JSON object with key 'annotation', got "
                            f"{type(d).__name__}")
        self.raw = d
        anns = _require(d, "annotation", fname)
        files = _names(_require(d, "filenames", fname), fname, "filenames")
        objects = _names(_require(d, "objects", fname), fname, "objects")
        verbs = _names(_require(d, "verbs", fname), fname, "verbs")
        corr_raw = _require(d, "correspondence", fname)
        if len(files) != len(anns):
            raise _err(fname, "-", "filenames", f"{len(files)} file names for {len(anns)} annotations")
        K, O, V = len(corr_raw), len(objects), len(verbs)
        corr = _hico_correspondence(corr_raw, O, V, fname)
        corr_o = np.array([c[1] for c in corr], dtype=np.int64)
        corr_v = np.array([c[2] for c in corr], dtype=np.int64)
        sizes = d.get("size")
        if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(anns)):
            raise _err(fname, "-", "size", f"expected a list of {len(anns)} [w, h], one per image")
        for j, a in enumerate(anns):
            self._ann.append(_hico_entry(a, fname, files[j], (K, O, V), corr_o, corr_v))
            self._sizes.append(None if sizes is None else _image_size(sizes[j], fname, files[j]))
        self._files = [str(f) for f in files]

        rare = _class_list(d, "rare", K, fname)
        if set(rare) & set(_class_list(d, "non_rare", K, fname)):
            raise _err(fname, "-", "non_rare", "a class is both rare and non-rare")
        prompts = _prompts_field(d, K, fname)
        if prompts is None:
            prompts = _hico_prompts(objects, verbs, corr)
        self.box_frame = _hico_frame(d, frame, fname)
        self.unseen = self._resolve_zero_shot(zero_shot, d, K)
        person = objects.index("person") if "person" in objects else 0
        self._class_space = ClassSpace(
            name=str(d.get("name", "hicodet")), prompts=list(prompts), object_names=objects,
            hoi_object=[[c[1]] for c in corr], hoi_verb=[c[2] for c in corr], verb_names=verbs,
            person_label=person, rare=rare, unseen=self.unseen)

        empty = d.get("empty", [])
        empty = _int_array(empty, len(empty) if isinstance(empty, list) else -1, 0, len(anns), fname, "-", "empty")
        if zero_shot_rule not in ("pair", "label"):
            raise ValueError(f"zero_shot_rule must be 'pair' or 'label', got {zero_shot_rule!r}")
        self.indices = self._training_subset(K, skip_empty, few_shot, seed, set(empty.tolist()), zero_shot_rule)

    def _training_subset(self, K: int, skip_empty: bool, few_shot, seed: int, empty: set,
                         rule: str) -> list:
        """The training filters, in order: zero-shot (the rows ``_zero_shot_rows`` names removed
        from self._ann, images left empty dropped), empty images (the file's ``empty`` list and
        images without rows), few-shot -> kept image indices."""
        keep = list(range(len(self._ann)))
        if self.unseen:
            unseen = np.zeros(K, dtype=bool)
            unseen[self.unseen] = True
            for j in keep:
                a = self._ann[j]
                m = ~_zero_shot_rows(a, unseen, rule, self.box_frame)
                if not m.all():
                    self._ann[j] = {key: val[m] for key, val in a.items()}
            skip_empty = True
        if skip_empty:
            keep = [j for j in keep if len(self._ann[j]["hoi"]) > 0 and j not in empty]
        if few_shot is not None:
            pos = _few_shot_indices([self._ann[j]["hoi"] for j in keep], K, int(few_shot), seed)
            keep = [keep[p] for p in pos]
        return keep

    @staticmethod
    def _split_names(name: str) -> list:
        names = [name]
        if name in ZERO_SHOT_SPLITS:
            names.append(ZERO_SHOT_SPLITS[name])
        names += [a for a, long in ZERO_SHOT_SPLITS.items() if long == name]
        return names

    def _resolve_zero_shot(self, zero_shot, d, K) -> list:
        fname = self.anno_file
        if zero_shot is None:
            return []
        if isinstance(zero_shot, str):
            names = self._split_names(zero_shot)
            zs = d.get("zero_shot")
            if zs is not None:
                if not isinstance(zs, dict):
                    raise _err(fname, "-", "zero_shot", "expected {split: [hoi indices]}")
                hit = [n for n in names if n in zs]
                if not hit:
                    raise _err(fname, "-", "zero_shot", f"no split {zero_shot!r}; the file has "
                               f"{sorted(zs)}")
                lst = zs[hit[0]]
                if isinstance(lst, dict):
                    lst = lst.get("unseen", [])
            else:
                f = data_root() / "hicodet" / "derived" / "zero_shot_unseen_hoi_indices.json"
                splits = read_json(f, "zero-shot split file", DataError).get("splits", {})
                hit = [n for n in names if n in splits]
                if not hit:
                    raise ValueError(f"{f}: no zero-shot split {zero_shot!r}; known: "
                                     f"{sorted(ZERO_SHOT_SPLITS)} + {sorted(splits)}")
                if K != 600:
                    raise _err(fname, "-", "zero_shot", f"split {zero_shot!r} of {f} is for the "
                               f"600 HICO-DET classes but the file has {K}; add a 'zero_shot' "
                               f"dict to the annotation file")
                lst = splits[hit[0]]["unseen"]
        else:
            lst = list(zero_shot)
        out = sorted({int(k) for k in lst})
        bad = [k for k in out if k < 0 or k >= K]
        if bad:
            raise _err(fname, "-", "zero_shot", f"class index {bad[0]} out of range [0, {K})")
        return out


#: one prompt per V-COCO action-role class name (fredzzhang's 24 ``classes``)
VCOCO_PROMPTS = {
    "hold obj": "a photo of a person holding something",
    "sit instr": "a photo of a person sitting on something",
    "ride instr": "a photo of a person riding something",
    "look obj": "a photo of a person looking at something",
    "hit instr": "a photo of a person hitting with something",
    "hit obj": "a photo of a person hitting something",
    "eat obj": "a photo of a person eating something",
    "eat instr": "a photo of a person eating with something",
    "jump instr": "a photo of a person jumping on something",
    "lay instr": "a photo of a person lying on something",
    "talk_on_phone instr": "a photo of a person talking on a phone",
    "carry obj": "a photo of a person carrying something",
    "throw obj": "a photo of a person throwing something",
    "catch obj": "a photo of a person catching something",
    "cut instr": "a photo of a person cutting with something",
    "cut obj": "a photo of a person cutting something",
    "work_on_computer instr": "a photo of a person working on a computer",
    "ski instr": "a photo of a person skiing on skis",
    "surf instr": "a photo of a person surfing on a surfboard",
    "skateboard instr": "a photo of a person riding a skateboard",
    "drink instr": "a photo of a person drinking with something",
    "kick obj": "a photo of a person kicking something",
    "read obj": "a photo of a person reading something",
    "snowboard instr": "a photo of a person riding a snowboard",
}


class VCOCO(_HOIDataset):
    """V-COCO in fredzzhang/vcoco's ``instances_vcoco_*.json`` format.

    Keys: ``annotations`` (per image {boxes_h, boxes_o, actions, objects, file_name}),
    ``classes`` (24 action-role names), ``objects`` (81 names: 'background' + COCO-80),
    optional ``images`` (COCO image ids) and ``action_to_object``. The file's object indices
    count 'background' as 0; targets use COCO-80 labels (file index - 1), so 'person' is 0.
    hoi = verb = the action-role index. The file has no image sizes: ``size`` comes from the
    image header. Pairs whose role object is missing were dropped by that format. An optional
    ``prompts`` list (24 strings) replaces the built-in VCOCO_PROMPTS.
    """

    dataset_name = "VCOCO"

    def __init__(self, image_root, anno_file):
        super().__init__(image_root, anno_file)
        fname = self.anno_file
        d = read_json(fname, "annotation file", DataError)
        if not isinstance(d, dict):
            raise DataError(f"{fname}: expected a JSON object with key 'annotations'")
        self.raw = d
        anns = _require(d, "annotations", fname)
        classes = _names(_require(d, "classes", fname), fname, "classes")
        objects81 = _names(_require(d, "objects", fname), fname, "objects")
        K, O81 = len(classes), len(objects81)
        ids = d.get("images")
        if ids is not None and (not isinstance(ids, list) or len(ids) != len(anns)):
            raise _err(fname, "-", "images", f"expected a list of {len(anns)} image ids, one per annotation")
        try:
            self.image_ids = as_index_list(ids, unique=True) if ids is not None else None
        except ValueError as e:
            raise _err(fname, "-", "images", str(e)) from None
        for j, a in enumerate(anns):
            if not isinstance(a, dict) or not isinstance(a.get("file_name"), str):
                raise _err(fname, j, "file_name", "missing key or not a string")
            img = a["file_name"]
            for key in ("boxes_h", "boxes_o", "actions", "objects"):
                if key not in a:
                    raise _err(fname, img, key, "missing key")
            bh, bo = _pair_boxes(a, fname, img)
            P = len(bh)
            act = _int_array(a["actions"], P, 0, K, fname, img, "actions")
            obj = _int_array(a["objects"], P, 1, O81, fname, img, "objects") - 1
            self._ann.append({"boxes_h": bh, "boxes_o": bo, "object": obj, "hoi": act,
                              "verb": act.copy()})
            self._files.append(str(img))
            self._sizes.append(None)
        self.indices = list(range(len(anns)))
        _names(self._files, fname, "annotations[].file_name")
        objects = objects81[1:]
        hoi_object = self._action_objects(d.get("action_to_object"), K, O81, fname)
        prompts = _prompts_field(d, K, fname)
        if prompts is None:
            prompts = [VCOCO_PROMPTS.get(c, "a photo of a person " + c.split(" ")[0].replace("_", " "))
                       for c in classes]
        self._class_space = ClassSpace(
            name="vcoco", prompts=prompts, object_names=objects, hoi_object=hoi_object,
            hoi_verb=list(range(K)), verb_names=classes,
            person_label=objects.index("person") if "person" in objects else 0)


    @staticmethod
    def _action_objects(a2o, K: int, O81: int, fname) -> list:
        """The optional ``action_to_object`` (per action-role class, object indices in the
        file's 81-object space; 0 = background is dropped) -> COCO-80 labels per class; absent:
        every object for every class."""
        if a2o is None:
            return [list(range(O81 - 1)) for _ in range(K)]
        if not isinstance(a2o, list) or len(a2o) != K:
            raise _err(fname, "-", "action_to_object", f"expected one list of object indices per class ({K})")
        out = []
        for k, lst in enumerate(a2o):
            try:
                out.append(sorted({o - 1 for o in as_index_list(lst, O81) if o > 0}))
            except ValueError as e:
                raise _err(fname, "-", f"action_to_object[{k}]", str(e)) from None
        return out


class SWiGHOI(_HOIDataset):
    """SWiG-HOI (THID / scwangdyd format): a JSON list, one entry per image:

        {"file_name": str, "img_id": int, "height": int, "width": int,
         "box_annotations": [{"bbox": [x1, y1, x2, y2], "category_id": int (0..999),
                              "aux_category_id": [...]}, ...],
         "hoi_annotations": [{"subject_id": int, "object_id": int, "action_id": int}, ...]}

    subject_id/object_id index box_annotations. A pair's class is the entry of
    SWIG_INTERACTIONS (shared/data/swig_hoi/derived/swig_v1_meta.json) with the same
    (action_id, object box category_id); K = 14,130. Pairs with object_id == -1 or an
    (action, object) combination absent from SWIG_INTERACTIONS are skipped and counted in
    ``self.skipped``. ``height``/``width`` are optional (else read from the image header).
    class_space(): rare = frequency 1, unseen = frequency 0 (never in training).
    """

    dataset_name = "SWiGHOI"

    def __init__(self, image_root, anno_file, meta_file=None):
        super().__init__(image_root, anno_file)
        fname = self.anno_file
        d = read_json(fname, "annotation file", DataError)
        if not isinstance(d, list):
            raise DataError(f"{fname}: expected a JSON list of images, got {type(d).__name__}")
        meta_file = Path(meta_file) if meta_file else data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
        try:
            obj_names, act_names, inters = swig_meta_tables(read_json(meta_file, "SWiG-HOI meta file", DataError))
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{meta_file}: SWiG-HOI meta file: {e}") from None
        mapper = {(x["action_id"], x["object_id"]): x["id"] for x in inters}
        self.skipped = {"no_object": 0, "unknown_interaction": 0}
        for j, a in enumerate(d):
            if not isinstance(a, dict) or not isinstance(a.get("file_name"), str):
                raise _err(fname, j, "file_name", "missing key or not a string")
            self._ann.append(self._entry(a, mapper, len(obj_names), len(act_names)))
            self._files.append(a["file_name"])
            self._sizes.append(self._size(a))
        _names(self._files, fname, "file_name")
        self.indices = list(range(len(d)))
        if self.skipped["unknown_interaction"]:
            warnings.warn(f"{fname}: skipped {self.skipped['unknown_interaction']} pairs whose "
                          f"(action, object) is not in SWIG_INTERACTIONS")
        prompts = []
        for x in inters:
            ob = obj_names[x["object_id"]].replace("_", " ")
            prompts.append(f"a photo of a person {act_names[x['action_id']].replace('_', ' ')} "
                           f"{_article(ob)} {ob}")
        self._class_space = ClassSpace(
            name="swig", prompts=prompts, object_names=obj_names,
            hoi_object=[[x["object_id"]] for x in inters],
            hoi_verb=[x["action_id"] for x in inters], verb_names=act_names,
            person_label=obj_names.index("person") if "person" in obj_names else 0,
            rare=[x["id"] for x in inters if x["frequency"] == 1],
            unseen=[x["id"] for x in inters if x["frequency"] == 0])

    def _entry(self, a: dict, mapper: dict, O: int, V: int) -> dict:
        """One image's entry -> {boxes_h, boxes_o [P, 4], object, hoi, verb Long[P]}. Box indices
        must point into box_annotations (a negative one never wraps around); object_id -1 (no
        object) and (action, object) pairs SWiG-HOI does not list are skipped and counted."""
        fname, img = self.anno_file, a["file_name"]
        boxes_raw = _require(a, "box_annotations", fname, img)
        hois = _require(a, "hoi_annotations", fname, img)
        for r, b in enumerate(boxes_raw):
            if not isinstance(b, dict) or "bbox" not in b or "category_id" not in b:
                raise _err(fname, img, f"box_annotations[{r}]", "needs 'bbox' and 'category_id'")
        boxes = _boxes_array([b["bbox"] for b in boxes_raw], fname, img, "box_annotations.bbox")
        cat = _int_array([b["category_id"] for b in boxes_raw], len(boxes_raw), 0, O, fname, img,
                         "box_annotations.category_id")
        rows = []                                  # (subject, object, class, action, category)
        for r, h in enumerate(hois):
            if not isinstance(h, dict) or not all(k in h for k in ("subject_id", "object_id", "action_id")):
                raise _err(fname, img, f"hoi_annotations[{r}]", "needs subject_id, object_id, action_id")
            try:
                key = "subject_id"
                s_ = as_index(h["subject_id"], len(boxes))
                key = "object_id"
                no_object = is_number(h["object_id"]) and h["object_id"] == -1
                o = -1 if no_object else as_index(h["object_id"], len(boxes))
                key = "action_id"
                act = as_index(h["action_id"], V)
            except ValueError as e:
                raise _err(fname, img, f"hoi_annotations[{r}].{key}", str(e)) from None
            if o == -1:
                self.skipped["no_object"] += 1
                continue
            k = mapper.get((act, int(cat[o])))
            if k is None:
                self.skipped["unknown_interaction"] += 1
                continue
            rows.append((s_, o, k, act, int(cat[o])))
        sh, so, k, v, c = (list(x) for x in zip(*rows)) if rows else ([], [], [], [], [])
        return {"boxes_h": boxes[sh].reshape(-1, 4), "boxes_o": boxes[so].reshape(-1, 4),
                "object": np.array(c, dtype=np.int64), "hoi": np.array(k, dtype=np.int64),
                "verb": np.array(v, dtype=np.int64)}

    def _size(self, a: dict):
        """(width, height) from the entry's optional width / height (positive integers)."""
        if a.get("width") is None and a.get("height") is None:
            return None
        return _image_size([a.get("width"), a.get("height")], self.anno_file, a["file_name"])


def collate(batch):
    """[(PIL.Image, target), ...] -> (list[PIL.Image], list[dict])."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


# ---------------------------------------------------------------------------------------
# detections
# ---------------------------------------------------------------------------------------

def _empty_dets() -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


def _make_dets(boxes, scores, labels) -> dict:
    return {
        "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),  # [N, 4]
        "scores": torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1)),  # [N]
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),  # [N]
    }


def convert_box_frame(boxes: torch.Tensor, frame: str, into: str) -> torch.Tensor:
    """[N, 4] boxes from box frame ``frame`` into ``into`` (common.BOX_FRAMES): x1 and y1 move by
    o(into) - o(frame), x2 and y2 stay. continuous -> hico1: [x1 + 1, y1 + 1, x2, y2]; hico1 ->
    continuous: [x1 - 1, y1 - 1, x2, y2] (UPT's conversion of the HICO-DET boxes). Widths are
    kept in each frame's convention (x2 - x1 + o). A continuous box narrower than one pixel has
    no hico1 form: it keeps its x2 / y2 and becomes one pixel wide / high (x1 = x2)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    shift = float(BOX_FRAMES[into] - BOX_FRAMES[frame])
    if shift == 0:
        return boxes.clone()
    out = boxes.clone()
    out[:, :2] = torch.minimum(boxes[:, :2] + shift, boxes[:, 2:])
    return out


def load_detections(path, filenames=None, image_ids=None, num_labels=None, frame=None, into=None) -> dict:
    """Read detections -> {filename: {"boxes": [N,4], "scores": [N], "labels": [N]}}.

    Two formats, told apart by the JSON's top level:
    - object (per-image, the project's format):
      ``{"<filename>": {"boxes": [[x1,y1,x2,y2], ...], "scores": [...], "labels": [...]}}``,
      labels already in the class space's object label space;
    - list (COCO results): ``[{"image_id": int, "category_id": COCO id (1..90),
      "bbox": [x, y, w, h], "score": float}, ...]``; needs ``image_ids``
      ({image_id: filename}); converted to COCO-80 labels and ``[x, y, x + w, y + h]``.
    filenames: when given, the result has exactly these keys, images the file lacks get
        zero detections, images not asked for are dropped; a file matching none of them is
        an error (almost surely the wrong file).
    num_labels: when given, labels must lie in [0, num_labels).
    frame, into: the file's box frame and the dataset's (common.BOX_FRAMES: hico1 |
        continuous); when both are given and differ, boxes are converted (convert_box_frame).
        A COCO results list is in the continuous frame (``frame`` defaults to it).
    Errors (DataError) name the file, the image and the field.
    """
    path = Path(path)
    d = read_json(path, "detection file", DataError)
    if isinstance(d, dict):
        out = {str(img): _image_detections(e, path, img, num_labels) for img, e in d.items()}
    elif isinstance(d, list):
        if image_ids is None:
            raise DataError(f"{path}: COCO results format needs image_ids {{image_id: filename}}")
        out = _coco_result_detections(d, path, {int(k): str(v) for k, v in image_ids.items()}, num_labels)
    else:
        raise DataError(f"{path}: expected a JSON object (per-image) or a list (COCO results)")
    if isinstance(d, list) and frame is None:
        frame = "continuous"
    for f in (frame, into):
        if f is not None and f not in BOX_FRAMES:
            raise DataError(f"{path}: box frame {f!r} is not one of {sorted(BOX_FRAMES)}")
    if frame is not None and into is not None and frame != into:
        out = {img: dict(e, boxes=convert_box_frame(e["boxes"], frame, into)) for img, e in out.items()}
    if filenames is not None:
        filenames = [str(f) for f in filenames]
        if filenames and out and not any(f in out for f in filenames):
            raise DataError(f"{path}: has detections for {len(out)} images but none of the "
                            f"{len(filenames)} requested (first: {filenames[0]!r})")
        out = {f: out.get(f, _empty_dets()) for f in filenames}
    return out


def _image_detections(e, path, img, num_labels) -> dict:
    """One image's entry of a per-image detection file -> detections, validated."""
    if not isinstance(e, dict):
        raise _err(path, img, "-", "expected {boxes, scores, labels}")
    for key in ("boxes", "scores", "labels"):
        if key not in e:
            raise _err(path, img, key, "missing key")
    boxes = _boxes_array(e["boxes"], path, img, "boxes")
    n = len(boxes)
    if not isinstance(e["scores"], list) or len(e["scores"]) != n:
        raise _err(path, img, "scores", f"expected {n} numbers")
    try:
        scores = np.asarray(e["scores"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise _err(path, img, "scores", "expected numbers") from None
    if not (np.isfinite(scores) & (np.abs(scores) <= FLOAT32_MAX)).all():
        raise _err(path, img, "scores", "non-finite score or one beyond float32's range")
    labels = _int_array(e["labels"], n, 0, num_labels if num_labels else 2 ** 62, path, img, "labels")
    return _make_dets(boxes, scores, labels)


def _coco_result_detections(entries: list, path, ids: dict, num_labels) -> dict:
    """A COCO results list -> {filename: detections} (COCO-80 labels, [x, y, x + w, y + h])."""
    acc = {}
    for r, e in enumerate(entries):
        img, box, score, label = _coco_result(e, f"entry {r}", path, ids, num_labels)
        acc.setdefault(img, ([], [], []))
        acc[img][0].append(box)
        acc[img][1].append(score)
        acc[img][2].append(label)
    return {img: _make_dets(b, s, lab) for img, (b, s, lab) in acc.items()}


def _coco_result(e, where: str, path, ids: dict, num_labels) -> tuple:
    """One COCO results entry -> (filename, [x1, y1, x2, y2], score, COCO-80 label), validated."""
    if not isinstance(e, dict):
        raise _err(path, where, "-", "expected an object")
    for key in ("image_id", "category_id", "bbox", "score"):
        if key not in e:
            raise _err(path, where, key, "missing key")
    iid = e["image_id"]
    if not isinstance(iid, int) or isinstance(iid, bool) or iid not in ids:
        raise _err(path, f"{where} (image_id {iid})", "image_id", "unknown image id")
    img = ids[iid]
    cid = e["category_id"]
    if not isinstance(cid, int) or isinstance(cid, bool) or cid not in COCO91_TO_COCO80:
        raise _err(path, f"{img} ({where})", "category_id", f"{cid!r} is not a COCO category id")
    b = e["bbox"]
    if not (isinstance(b, list) and len(b) == 4 and all(is_number(x) for x in b)):
        raise _err(path, f"{img} ({where})", "bbox", "expected [x, y, w, h]")
    x, y, w, h = (float(v) for v in b)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0 or \
            not all(abs(v) <= FLOAT32_MAX for v in (x, y, x + w, y + h)):
        raise _err(path, f"{img} ({where})", "bbox", f"bad box {b} (non-finite, negative size or beyond float32)")
    s = e["score"]
    if not is_number(s) or not math.isfinite(s) or abs(s) > FLOAT32_MAX:
        raise _err(path, f"{img} ({where})", "score", f"bad score {s!r}")
    lab = COCO91_TO_COCO80[cid]
    if num_labels is not None and lab >= num_labels:
        raise _err(path, f"{img} ({where})", "category_id", f"label {lab} >= {num_labels}")
    return img, [x, y, x + w, y + h], float(s), lab


def save_detections(path, detections: dict, decimals: int = 2):
    """Write {filename: dets} in the per-image JSON format (atomically). Boxes and scores are
    rounded to ``decimals`` places (None: full float precision)."""
    def r(x):
        return [round(float(v), decimals) if decimals is not None else float(v) for v in x]
    obj = {}
    for img, e in detections.items():
        boxes = torch.as_tensor(e["boxes"]).reshape(-1, 4).tolist()
        obj[str(img)] = {
            "boxes": [r(b) for b in boxes],
            "scores": r(torch.as_tensor(e["scores"]).reshape(-1).tolist()),
            "labels": [int(v) for v in torch.as_tensor(e["labels"]).reshape(-1).tolist()],
        }
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


def gt_detections(target: dict, person_label: int = 0, return_index: bool = False):
    """Unique ground-truth boxes of a target as detections (score 1.0).

    Human boxes (label ``person_label``) come first in order of first appearance, then
    object boxes (label ``target["object"]``); a box is a duplicate when its 4 coordinates
    AND its label are equal (so a person that is also the object of a human-human pair
    appears once). With ``return_index``: also (idx_h Long[P], idx_o Long[P]) = the
    detection index of each row's human and object box.
    """
    bh = torch.as_tensor(target["boxes_h"], dtype=torch.float32).reshape(-1, 4)  # [P, 4]
    bo = torch.as_tensor(target["boxes_o"], dtype=torch.float32).reshape(-1, 4)  # [P, 4]
    obj = torch.as_tensor(target["object"], dtype=torch.long).reshape(-1)  # [P]
    seen = {}
    boxes, labels = [], []

    def add(box, lab):
        key = (tuple(box.tolist()), int(lab))
        if key not in seen:
            seen[key] = len(boxes)
            boxes.append(box.tolist())
            labels.append(int(lab))
        return seen[key]

    idx_h = [add(b, person_label) for b in bh]
    idx_o = [add(b, lab) for b, lab in zip(bo, obj)]
    dets = _make_dets(boxes, [1.0] * len(boxes), labels)
    if return_index:
        return dets, torch.tensor(idx_h, dtype=torch.long), torch.tensor(idx_o, dtype=torch.long)
    return dets


def select_boxes(dets: dict, person_label: int = 0, nms: float = 0.5, score_thresh: float = 0.2,
                 min_h: int = 3, max_h: int = 15, min_o: int = 3, max_o: int = 15,
                 return_index: bool = False):
    """Pair-bounding rules of the two-stage peers (PROTOCOLS.md), exactly:

    1. class-wise NMS at IoU ``nms`` (torchvision.ops.batched_nms, labels as classes);
    2. among the survivors, humans (label == person_label) and objects (the rest) are
       handled separately: let n = how many have score >= score_thresh. If n < min, keep the
       top ``min`` by score (even under the threshold; all of them if fewer exist); if
       n > max, keep the top ``max``; else keep the n above the threshold.
    Output: humans (score desc), then objects (score desc); equal scores keep input order.
    With ``return_index`` also returns Long[N'] indices into the input.
    """
    from torchvision.ops import batched_nms

    boxes = torch.as_tensor(dets["boxes"], dtype=torch.float32).reshape(-1, 4)  # [N, 4]
    scores = torch.as_tensor(dets["scores"], dtype=torch.float32).reshape(-1)  # [N]
    labels = torch.as_tensor(dets["labels"], dtype=torch.long).reshape(-1)  # [N]
    if len(boxes):
        keep = batched_nms(boxes, scores, labels, nms)
        survivor = torch.zeros(len(boxes), dtype=torch.bool)
        survivor[keep] = True
    else:
        survivor = torch.zeros(0, dtype=torch.bool)
    # stable order: score desc, ties by input index
    order = torch.from_numpy(np.argsort(-scores.numpy(), kind="stable")).long()
    chosen = []
    for is_h, lo, hi in ((True, min_h, max_h), (False, min_o, max_o)):
        cand = [int(i) for i in order if survivor[i] and ((labels[i] == person_label) == is_h)]
        n = sum(1 for i in cand if scores[i] >= score_thresh)
        if n < lo:
            cand = cand[:lo]
        elif n > hi:
            cand = cand[:hi]
        else:
            cand = [i for i in cand if scores[i] >= score_thresh]
        chosen += cand
    idx = torch.tensor(chosen, dtype=torch.long)
    out = {"boxes": boxes[idx], "scores": scores[idx], "labels": labels[idx]}
    if return_index:
        return out, idx
    return out
