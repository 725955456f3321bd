"""The synthetic HOI world: procedurally drawn HOI images + HICO-DET format JSON.

``make_synthetic_world(root, ...)`` paints people and objects interacting (ride, sit on,
hold, kick, look at, fly, shake hands) in images, writes their annotation files in the
HICO-DET format (plus ``prompts``, ``zero_shot``, ``name``) and a simulated detector's boxes
in the per-image detection format; ``synthetic_class_space()`` is its class space. Boxes are
in continuous pixel edges: pixel (row i, col j) covers [j, j+1) x [i, i+1). Deterministic
from the seed, whatever the number of worker processes.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import atomic_write_text
from data import COCO80_NAMES, ClassSpace, article

__all__ = ["make_synthetic_world", "synthetic_class_space", "SYN_VERBS", "SYN_CLASSES", "SYN_ZERO_SHOT"]

# ---------------------------------------------------------------------------------------
# synthetic HOI world: rasteriser
# ---------------------------------------------------------------------------------------
# Continuous pixel frame: pixel (row i, col j) covers [j, j+1) x [i, i+1), its centre is
# (j + 0.5, i + 0.5). A primitive paints the pixels whose centre lies inside it. Every
# primitive returns the painted extent [x1, y1, x2, y2] (integers, x2/y2 exclusive), and the
# box of an entity is the union of its primitives' extents (amodal: occlusion by entities
# drawn later does not shrink it).

class _Raster:
    """Tiny drawing layer over PIL.ImageDraw in the continuous pixel frame, tracking the
    exact painted extent of the current entity (each primitive is also drawn into a
    one-channel mask whose ``getbbox`` is the extent; PIL's pixel-index frame is ours
    shifted by half a pixel)."""

    def __init__(self, img: Image.Image):
        self.img = img
        self.W, self.H = img.size
        self.draw = ImageDraw.Draw(img)
        self._mask = None
        self._mdraw = None

    def begin(self):
        self._mask = Image.new("L", (self.W, self.H))
        self._mdraw = ImageDraw.Draw(self._mask)

    def end(self):
        """Painted extent [x1, y1, x2, y2] (ints, x2/y2 exclusive) since ``begin``, or None."""
        if self._mask is None:
            return None
        e = self._mask.getbbox()
        self._mask = self._mdraw = None
        return e

    def _both(self, fn, *args, fill, **kw):
        getattr(self.draw, fn)(*args, fill=fill, **kw)
        if self._mdraw is not None:
            getattr(self._mdraw, fn)(*args, fill=255, **kw)

    def ellipse(self, c, rx, ry, colour):
        x, y = c[0] - 0.5, c[1] - 0.5
        self._both("ellipse", [x - rx, y - ry, x + rx, y + ry], fill=tuple(colour))

    def disc(self, c, r, colour):
        self.ellipse(c, r, r, colour)

    def ring(self, c, r_out, r_in, colour):
        x, y = c[0] - 0.5, c[1] - 0.5
        w = max(1, int(round(r_out - r_in)))
        getattr(self.draw, "ellipse")([x - r_out, y - r_out, x + r_out, y + r_out], outline=tuple(colour), width=w)
        if self._mdraw is not None:
            self._mdraw.ellipse([x - r_out, y - r_out, x + r_out, y + r_out], outline=255, width=w)

    def segment(self, a, b, width, colour):
        """Thick line from a to b with round caps."""
        colour = tuple(colour)
        pts = [(float(a[0]) - 0.5, float(a[1]) - 0.5), (float(b[0]) - 0.5, float(b[1]) - 0.5)]
        self._both("line", pts, fill=colour, width=max(1, int(round(width))))
        if width >= 2.5:
            r = width / 2.0
            for x, y in pts:
                self._both("ellipse", [x - r, y - r, x + r, y + r], fill=colour)

    def polygon(self, pts, colour):
        self._both("polygon", [(float(x) - 0.5, float(y) - 0.5) for x, y in pts], fill=tuple(colour))

    def rect(self, x1, y1, x2, y2, colour):
        self.polygon([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], colour)

    def upper_half_ellipse(self, c, rx, ry, colour):
        x, y = c[0] - 0.5, c[1] - 0.5
        self._both("pieslice", [x - rx, y - ry, x + rx, y + ry], 180, 360, fill=tuple(colour))


# ---------------------------------------------------------------------------------------
# synthetic HOI world: figures and objects
# ---------------------------------------------------------------------------------------
# A person is a dict {"kind": "person", "H": height, "dir": +1/-1 (the side its "front"
# limbs a point to), "facing": "front"|"left"|"right", "pts": {keypoint: np.array([x, y])},
# colours}. An object is {"kind": "object", "name", "label" (COCO-80), "dir", "pts": {"p1",
# "p2"} (its design box corners), colours}. Geometry lives only in "pts" so that a layout
# can be shifted by adding to every point.

_SKIN = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36),
         (92, 58, 35)]
_HAIR = [(20, 20, 20), (70, 45, 25), (120, 80, 40), (200, 170, 90), (150, 150, 150)]

#: object class -> (base colour, design-box width/height ratio)
_OBJ_STYLE = {
    "bicycle": ((40, 90, 200), 1.6),
    "horse": ((140, 80, 40), 1.35),
    "chair": ((160, 110, 60), 0.58),
    "bench": ((110, 70, 30), 3.0),
    "cup": ((230, 230, 235), 1.15),
    "sports_ball": ((245, 245, 245), 1.0),
    "umbrella": ((220, 40, 60), 1.0),
    "kite": ((250, 200, 0), 0.62),
}

#: attachment points of each object, (u, v) fractions of its design box, for dir = +1
#: (u is mirrored when dir = -1)
_ATTACH = {
    "bicycle": {"seat": (0.42, 0.22), "bar": (0.74, 0.08), "pedal": (0.48, 0.68)},
    "horse": {"back": (0.47, 0.25), "rein": (0.80, 0.27)},
    "chair": {"seat": (0.62, 0.55)},
    "bench": {"seat": (0.5, 0.0)},
    "cup": {"handle": (0.9, 0.5)},
    "sports_ball": {"side": (0.12, 0.5)},
    "umbrella": {"handle": (0.5, 0.82)},
    "kite": {"grip": (0.5, 0.45), "tail": (0.5, 0.7)},
}


def _jitter(rng, colour, amount=30):
    j = rng.integers(-amount, amount + 1, size=3).tolist()
    return tuple(min(255, max(0, int(c) + d)) for c, d in zip(colour, j))


def _contrast(colour):
    """A dark or light colour that stands out on ``colour``."""
    return (25, 25, 25) if sum(colour) > 330 else (235, 235, 235)


def _new_person(hip, H, dir_=1, facing="front") -> dict:
    """A standing person (hip at ``hip``, height ``H``), arms hanging, legs apart."""
    x, y = float(hip[0]), float(hip[1])
    P = lambda dx, dy: np.array([x + dx * H, y + dy * H], dtype=np.float64)  # noqa: E731
    d = dir_
    pts = {
        "hip": P(0, 0), "neck": P(0, -0.33), "head": P(0, -0.44), "shoulder": P(0, -0.30),
        "elbow_a": P(d * 0.12, -0.17), "hand_a": P(d * 0.17, -0.05),
        "elbow_b": P(-d * 0.12, -0.17), "hand_b": P(-d * 0.17, -0.05),
        "knee_a": P(d * 0.06, 0.22), "foot_a": P(d * 0.09, 0.44),
        "knee_b": P(-d * 0.06, 0.22), "foot_b": P(-d * 0.09, 0.44),
    }
    return {"kind": "person", "label": 0, "H": float(H), "dir": int(d), "facing": facing, "pts": pts}


def _colour_person(rng, p):
    """Random clothes, skin and hair colours (drawn at render time)."""
    c = rng.integers(0, 256, size=6)
    p["shirt"], p["pants"] = tuple(int(v) for v in c[:3]), tuple(int(v) for v in c[3:])
    p["skin"] = _jitter(rng, _SKIN[int(rng.integers(len(_SKIN)))], 12)
    p["hair"] = _jitter(rng, _HAIR[int(rng.integers(len(_HAIR)))], 15)
    p["shoe"] = _jitter(rng, (40, 30, 30), 20)


def _colour_object(rng, o):
    """Class colour jittered, plus a random second colour (drawn at render time)."""
    o["colour"] = _jitter(rng, _OBJ_STYLE[o["name"]][0], 35)
    o["colour2"] = tuple(int(v) for v in rng.integers(0, 256, size=3))


def _new_object(name, w, dir_=1, at=None, part=None) -> dict:
    """An object of width ``w``; if ``at``/``part`` are given, its attachment point ``part``
    lands on point ``at``, else its design box starts at (0, 0)."""
    ratio = _OBJ_STYLE[name][1]
    h = w / ratio
    x1, y1 = 0.0, 0.0
    if at is not None:
        u, v = _ATTACH[name][part]
        u = u if dir_ > 0 else 1.0 - u
        x1, y1 = float(at[0]) - u * w, float(at[1]) - v * h
    return {"kind": "object", "name": name, "label": COCO80_NAMES.index(name), "dir": int(dir_),
            "pts": {"p1": np.array([x1, y1]), "p2": np.array([x1 + w, y1 + h])}}


def _attach(obj, part) -> np.ndarray:
    u, v = _ATTACH[obj["name"]][part]
    return _obj_point(obj, u, v)


def _obj_point(obj, u, v) -> np.ndarray:
    """Point at fractions (u, v) of the object's design box (u mirrored when dir = -1)."""
    p1, p2 = obj["pts"]["p1"], obj["pts"]["p2"]
    if obj["dir"] < 0:
        u = 1.0 - u
    return np.array([p1[0] + u * (p2[0] - p1[0]), p1[1] + v * (p2[1] - p1[1])])


def _approx_box(ent) -> np.ndarray:
    """Conservative extent [x1, y1, x2, y2] of an entity (before drawing)."""
    pts = ent["pts"]
    if ent["kind"] == "object":
        p1, p2 = pts["p1"], pts["p2"]
        return np.array([p1[0] - 1, p1[1] - 1, p2[0] + 1, p2[1] + 1])
    if ent["kind"] == "string":
        a, b = pts["a"], pts["b"]
        return np.array([min(a[0], b[0]) - 1, min(a[1], b[1]) - 1, max(a[0], b[0]) + 1,
                         max(a[1], b[1]) + 1])
    H = ent["H"]
    xs = [p[0] for p in pts.values()]
    ys = [p[1] for p in pts.values()]
    pad = 0.06 * H + 1
    hx, hy = pts["head"]
    r = 0.13 * H
    return np.array([min(min(xs) - pad, hx - 1.6 * r), min(min(ys) - pad, hy - r),
                     max(max(xs) + pad, hx + 1.6 * r), max(ys) + pad])


def _draw_person(R: _Raster, p: dict):
    """Stick/blob figure: legs, arms, torso, hands, feet, head with hair and a face whose
    eyes/nose show where it looks ("front": two eyes; "left"/"right": one eye and a nose
    sticking out on that side, hair at the back)."""
    H, k = p["H"], p["pts"]
    lw = max(1.6, 0.065 * H)  # limb width
    tw = max(3.0, 0.16 * H)  # torso width
    hr = max(2.5, 0.11 * H)  # head radius

    def leg(s):
        R.segment(k["hip"], k["knee_" + s], lw, p["pants"])
        R.segment(k["knee_" + s], k["foot_" + s], lw, p["pants"])
        R.disc(k["foot_" + s], lw * 0.75, p["shoe"])

    def arm(s):
        R.segment(k["shoulder"], k["elbow_" + s], lw * 0.9, p["shirt"])
        R.segment(k["elbow_" + s], k["hand_" + s], lw * 0.9, p["shirt"])
        R.disc(k["hand_" + s], max(1.0, 0.045 * H), p["skin"])

    leg("b")
    arm("b")
    R.segment(k["neck"], k["hip"], tw, p["shirt"])
    leg("a")
    arm("a")
    c = k["head"]
    f = {"left": -1.0, "right": 1.0}.get(p["facing"], 0.0)
    R.disc((c[0] - f * 0.22 * hr, c[1] - 0.22 * hr), hr, p["hair"])
    R.disc((c[0], c[1] + 0.06 * hr), hr * 0.9, p["skin"])
    eye_r = max(0.7, 0.17 * hr)
    if f == 0.0:
        R.disc((c[0] - 0.38 * hr, c[1]), eye_r, (20, 20, 20))
        R.disc((c[0] + 0.38 * hr, c[1]), eye_r, (20, 20, 20))
    else:
        R.disc((c[0] + f * 0.45 * hr, c[1] - 0.05 * hr), eye_r, (20, 20, 20))
        R.polygon([(c[0] + f * 0.75 * hr, c[1] - 0.05 * hr), (c[0] + f * 1.45 * hr, c[1] + 0.3 * hr),
                   (c[0] + f * 0.75 * hr, c[1] + 0.5 * hr)], p["skin"])


def _draw_bicycle(R: _Raster, o: dict):
    """Two wheels (rings), a frame of bars, a saddle and a handlebar."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    h = o["pts"]["p2"][1] - o["pts"]["p1"][1]
    wr = 0.32 * h
    t = max(1.2, 0.08 * h)
    for u in (0.2, 0.8):
        R.ring(P(u, 0.68), wr, wr - t, (30, 30, 30))
        R.disc(P(u, 0.68), max(0.8, t * 0.6), o["colour2"])
    for a, b in (((0.2, 0.68), (0.48, 0.68)), ((0.48, 0.68), (0.42, 0.25)),
                 ((0.2, 0.68), (0.42, 0.25)), ((0.42, 0.25), (0.72, 0.25)),
                 ((0.48, 0.68), (0.72, 0.25)), ((0.72, 0.25), (0.8, 0.68)),
                 ((0.72, 0.25), (0.74, 0.08))):
        R.segment(P(*a), P(*b), t, o["colour"])
    R.segment(P(0.34, 0.2), P(0.5, 0.2), t * 1.6, (30, 30, 30))  # saddle
    R.segment(P(0.68, 0.06), P(0.8, 0.06), t * 1.3, (30, 30, 30))  # handlebar


def _draw_horse(R: _Raster, o: dict):
    """Body ellipse, four legs, a neck, a head, a tail."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    w = o["pts"]["p2"][0] - o["pts"]["p1"][0]
    h = o["pts"]["p2"][1] - o["pts"]["p1"][1]
    t = max(1.8, 0.07 * w)
    c, dark = o["colour"], tuple(max(0, v - 50) for v in o["colour"])
    for u0, u1 in ((0.3, 0.27), (0.38, 0.4), (0.62, 0.6), (0.72, 0.74)):
        R.segment(P(u0, 0.5), P(u1, 0.97), t, dark if u0 in (0.38, 0.72) else c)
    R.segment(P(0.2, 0.4), P(0.06, 0.72), t * 0.8, dark)  # tail
    R.ellipse(P(0.5, 0.43), 0.31 * w, 0.18 * h, c)
    R.segment(P(0.74, 0.38), P(0.86, 0.14), t * 1.5, c)  # neck
    R.ellipse(P(0.9, 0.12), 0.09 * w, 0.07 * h, c)  # head
    R.segment(P(0.8, 0.1), P(0.84, 0.02), t * 0.7, dark)  # ear / mane


def _draw_chair(R: _Raster, o: dict):
    """Seat plank, back rest on the rear side, two legs."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    w = o["pts"]["p2"][0] - o["pts"]["p1"][0]
    t = max(1.5, 0.14 * w)
    R.segment(P(0.1, 0.0), P(0.1, 0.58), t, o["colour"])  # back
    R.segment(P(0.1, 0.12), P(0.1, 0.4), t * 1.6, o["colour2"])  # back cushion
    R.segment(P(0.06, 0.58), P(0.94, 0.58), t * 1.2, o["colour"])  # seat
    R.segment(P(0.12, 0.58), P(0.12, 1.0), t, o["colour"])
    R.segment(P(0.88, 0.58), P(0.88, 1.0), t, o["colour"])


def _draw_bench(R: _Raster, o: dict):
    """A long thick plank on three legs."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    h = o["pts"]["p2"][1] - o["pts"]["p1"][1]
    p1, p2 = o["pts"]["p1"], o["pts"]["p2"]
    R.rect(p1[0], p1[1], p2[0], p1[1] + 0.3 * h, o["colour"])
    R.rect(p1[0] + 0.3, p1[1] + 0.3 * h, p2[0] - 0.3, p1[1] + 0.3 * h + max(1.0, 0.08 * h), o["colour2"])
    for u in (0.08, 0.5, 0.92):
        R.segment(P(u, 0.3), P(u, 1.0), max(1.5, 0.2 * h), o["colour"])


def _draw_cup(R: _Raster, o: dict):
    """A tapered cup body with a contrasting rim and a handle ring."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    w = o["pts"]["p2"][0] - o["pts"]["p1"][0]
    R.ring(P(0.78, 0.5), 0.22 * w, 0.22 * w - max(1.0, 0.1 * w), o["colour"])
    R.polygon([P(0.0, 0.0), P(0.7, 0.0), P(0.6, 1.0), P(0.1, 1.0)], o["colour"])
    R.segment(P(0.02, 0.06), P(0.68, 0.06), max(1.0, 0.12 * w), o["colour2"])


def _draw_sports_ball(R: _Raster, o: dict):
    """A disc with a contrasting pentagon patch and seam."""
    p1, p2 = o["pts"]["p1"], o["pts"]["p2"]
    c = (p1 + p2) / 2
    r = (p2[0] - p1[0]) / 2
    R.disc(c, r, o["colour"])
    dark = _contrast(o["colour"])
    ang = np.linspace(0, 2 * np.pi, 6)[:-1] - np.pi / 2
    R.polygon([(c[0] + 0.42 * r * np.cos(a), c[1] + 0.42 * r * np.sin(a)) for a in ang], dark)
    R.segment((c[0] - 0.9 * r, c[1] + 0.35 * r), (c[0] + 0.9 * r, c[1] + 0.35 * r), max(0.8, 0.12 * r), dark)


def _draw_umbrella(R: _Raster, o: dict):
    """A half-disc canopy on a shaft with a hooked handle."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    w = o["pts"]["p2"][0] - o["pts"]["p1"][0]
    h = o["pts"]["p2"][1] - o["pts"]["p1"][1]
    t = max(1.2, 0.05 * w)
    R.segment(P(0.5, 0.3), P(0.5, 0.92), t, (40, 40, 40))
    R.segment(P(0.5, 0.92), P(0.38, 0.96), t, (40, 40, 40))
    c = P(0.5, 0.36)
    R.upper_half_ellipse(c, w / 2, c[1] - o["pts"]["p1"][1], o["colour"])
    for u in (0.25, 0.5, 0.75):
        R.segment(P(u, 0.34), P(0.5, 0.03), max(0.8, t * 0.6), o["colour2"])
    del h


def _draw_kite(R: _Raster, o: dict):
    """A diamond with cross sticks and a bow-tied tail."""
    P = lambda u, v: _obj_point(o, u, v)  # noqa: E731
    w = o["pts"]["p2"][0] - o["pts"]["p1"][0]
    R.polygon([P(0.5, 0.0), P(1.0, 0.25), P(0.5, 0.7), P(0.0, 0.25)], o["colour"])
    t = max(0.8, 0.06 * w)
    R.segment(P(0.5, 0.0), P(0.5, 0.7), t, o["colour2"])
    R.segment(P(0.0, 0.25), P(1.0, 0.25), t, o["colour2"])
    pts = [P(0.5, 0.7), P(0.35, 0.8), P(0.6, 0.9), P(0.45, 1.0)]
    for a, b in zip(pts[:-1], pts[1:]):
        R.segment(a, b, max(0.8, t * 0.8), (60, 60, 60))
    R.disc(P(0.4, 0.85), max(1.0, 0.08 * w), o["colour2"])


_DRAW = {"bicycle": _draw_bicycle, "horse": _draw_horse, "chair": _draw_chair,
         "bench": _draw_bench, "cup": _draw_cup, "sports_ball": _draw_sports_ball,
         "umbrella": _draw_umbrella, "kite": _draw_kite}


# ---------------------------------------------------------------------------------------
# synthetic HOI world: interactions
# ---------------------------------------------------------------------------------------
# Each interaction builder returns (entities in drawing order, pairs [(i_human, i_object,
# class)], gaze regions) with the first person's hip near (0, 0); the layout code shifts
# the whole group to a free place of the image. The cue of every interaction is geometric:
#   ride       the person's hip sits on the saddle / the horse's back, hands on the bar
#   sit_on     hip on the seat, thighs horizontal, feet on the floor
#   hold       one hand inside the object's box (at its handle / side)
#   kick       one leg stretched, its foot inside the ball's box
#   look_at    the head is turned (one eye, nose) towards the object, which does not touch
#              the person; no other object lies between them
#   fly        raised hand, a string from the hand up to a kite high above
#   shake_hand two people whose reaching hands touch (both directions are labelled)
# Everybody else faces the camera (two eyes) or looks sideways at empty space.

#: verbs of the synthetic world
SYN_VERBS = ["ride", "sit_on", "hold", "kick", "look_at", "fly", "shake_hand"]
_VERB_ING = {"ride": "riding", "sit_on": "sitting on", "hold": "holding", "kick": "kicking",
             "look_at": "looking at", "fly": "flying", "shake_hand": "shaking hands with"}

#: classes: (verb, object, train pairs per 1000 train images, test pairs per 1000 test images)
SYN_CLASSES = [
    ("ride", "bicycle", 240, 160),
    ("ride", "horse", 100, 100),
    ("sit_on", "chair", 200, 150),
    ("sit_on", "bench", 4, 30),
    ("hold", "cup", 260, 160),
    ("hold", "sports_ball", 120, 100),
    ("hold", "umbrella", 60, 60),
    ("hold", "kite", 3, 30),
    ("kick", "sports_ball", 220, 150),
    ("look_at", "sports_ball", 130, 100),
    ("look_at", "cup", 70, 70),
    ("look_at", "horse", 40, 50),
    ("look_at", "kite", 4, 30),
    ("look_at", "bicycle", 3, 30),
    ("fly", "kite", 180, 130),
    ("shake_hand", "person", 100, 80),
]

#: zero-shot splits of the synthetic world (class indices)
SYN_ZERO_SHOT = {
    "rf-uc": [7, 13],  # hold kite, look_at bicycle (rare)
    "nf-uc": [6, 10],  # hold umbrella, look_at cup (non-rare)
    "uo": [7, 12, 14],  # every class of the object kite
    "uv": [0, 1],  # every class of the verb ride
}

_SIZE = {  # object width as a fraction of the person height H: (low, high)
    "bicycle": (0.8, 0.95), "horse": (1.0, 1.2), "chair": (0.28, 0.33), "bench": (0.75, 0.95),
    "cup": (0.17, 0.21), "sports_ball": (0.17, 0.22), "umbrella": (0.65, 0.8),
    "kite": (0.22, 0.28),
}


def _obj_width(rng, name, H):
    lo, hi = _SIZE[name]
    return float(rng.uniform(lo, hi)) * H


def _bend(a, b, H, down=0.04):
    """Elbow / knee between a and b, pushed ``down`` * H downwards."""
    return (np.asarray(a) + np.asarray(b)) / 2 + np.array([0.0, down * H])


def _ride(rng, H, name):
    d = int(rng.choice([-1, 1]))
    obj = _new_object(name, _obj_width(rng, name, H), d)
    seat = _attach(obj, "seat" if name == "bicycle" else "back")
    p = _new_person(seat + np.array([0.0, -0.03 * H]), H, d)
    k = p["pts"]
    hand = _attach(obj, "bar" if name == "bicycle" else "rein")
    k["hand_a"], k["hand_b"] = hand, hand + np.array([-d * 0.03 * H, 0.02 * H])
    k["elbow_a"] = _bend(k["shoulder"], k["hand_a"], H, 0.05)
    k["elbow_b"] = _bend(k["shoulder"], k["hand_b"], H, 0.07)
    if name == "bicycle":
        pedal = _attach(obj, "pedal")
        k["foot_a"], k["foot_b"] = pedal + np.array([d * 0.04 * H, 0.0]), pedal - np.array([d * 0.04 * H, 0.02 * H])
    else:
        k["foot_a"] = k["hip"] + np.array([d * 0.07 * H, 0.3 * H])
        k["foot_b"] = k["hip"] + np.array([d * 0.03 * H, 0.28 * H])
    k["knee_a"] = k["hip"] + np.array([d * 0.15 * H, 0.1 * H])
    k["knee_b"] = k["hip"] + np.array([d * 0.11 * H, 0.12 * H])
    return [obj, p], [(1, 0)], []


def _sit_on(rng, H, name):
    d = int(rng.choice([-1, 1]))
    w = _obj_width(rng, name, H)
    obj = _new_object(name, w, d)
    if name == "chair":  # chair height so that the seat is at knee height
        h = 0.52 * H
        obj["pts"]["p2"] = obj["pts"]["p1"] + np.array([w, h])
    seat = _attach(obj, "seat")
    p = _new_person(seat + np.array([0.0, -0.05 * H]), H, d)
    k = p["pts"]
    floor = obj["pts"]["p2"][1]
    k["knee_a"] = k["hip"] + np.array([d * 0.2 * H, 0.0])
    k["knee_b"] = k["knee_a"] + np.array([-d * 0.03 * H, 0.01 * H])
    k["foot_a"] = np.array([k["knee_a"][0] + d * 0.03 * H, floor - 0.02 * H])
    k["foot_b"] = k["foot_a"] + np.array([-d * 0.04 * H, 0.0])
    k["hand_a"] = k["hip"] + np.array([d * 0.15 * H, -0.04 * H])
    k["hand_b"] = k["hip"] + np.array([d * 0.11 * H, -0.03 * H])
    k["elbow_a"] = k["shoulder"] + np.array([d * 0.04 * H, 0.16 * H])
    k["elbow_b"] = k["shoulder"] + np.array([d * 0.02 * H, 0.16 * H])
    return [obj, p], [(1, 0)], []


def _hold(rng, H, name):
    d = int(rng.choice([-1, 1]))
    p = _new_person((0.0, 0.0), H, d)
    k = p["pts"]
    sh = k["shoulder"]
    w = _obj_width(rng, name, H)
    if name == "cup":
        hand = sh + np.array([d * rng.uniform(0.2, 0.26) * H, rng.uniform(0.05, 0.2) * H])
        obj = _new_object(name, w, -d, at=hand, part="handle")
    elif name == "sports_ball":
        hand = sh + np.array([d * rng.uniform(0.2, 0.26) * H, rng.uniform(0.05, 0.2) * H])
        obj = _new_object(name, w, d, at=hand, part="side")
    elif name == "umbrella":
        hand = sh + np.array([d * 0.13 * H, 0.06 * H])
        obj = _new_object(name, w, d, at=hand, part="handle")
    else:  # kite, held low beside the body
        hand = sh + np.array([d * 0.24 * H, 0.16 * H])
        obj = _new_object(name, w, d, at=hand, part="grip")
    k["hand_a"] = hand
    k["elbow_a"] = _bend(sh, hand, H, 0.06)
    return [obj, p], [(1, 0)], []


def _kick(rng, H, name="sports_ball"):
    d = int(rng.choice([-1, 1]))
    p = _new_person((0.0, 0.0), H, d)
    k = p["pts"]
    k["knee_a"] = k["hip"] + np.array([d * 0.15 * H, 0.16 * H])
    k["foot_a"] = k["hip"] + np.array([d * 0.31 * H, 0.33 * H])
    k["knee_b"] = k["hip"] + np.array([-d * 0.03 * H, 0.22 * H])
    k["foot_b"] = k["hip"] + np.array([-d * 0.05 * H, 0.44 * H])
    k["hand_b"] = k["shoulder"] + np.array([-d * 0.24 * H, 0.08 * H])
    k["elbow_b"] = _bend(k["shoulder"], k["hand_b"], H, -0.02)
    k["hand_a"] = k["shoulder"] + np.array([d * 0.12 * H, 0.24 * H])
    k["elbow_a"] = _bend(k["shoulder"], k["hand_a"], H, 0.0)
    obj = _new_object(name, _obj_width(rng, name, H), d, at=k["foot_a"], part="side")
    return [obj, p], [(1, 0)], []


def _look_at(rng, H, name):
    d = int(rng.choice([-1, 1]))
    p = _new_person((0.0, 0.0), H, d, facing="right" if d > 0 else "left")
    k = p["pts"]
    w = _obj_width(rng, name, H)
    if name in ("bicycle", "horse"):
        w *= 0.85
    obj = _new_object(name, w, int(rng.choice([-1, 1])))
    h = obj["pts"]["p2"][1] - obj["pts"]["p1"][1]
    if name in ("bicycle", "horse"):  # standing on the same floor
        y1 = k["foot_a"][1] + rng.uniform(-0.05, 0.05) * H - h
    elif name == "kite":
        y1 = k["head"][1] + rng.uniform(-0.25, 0.05) * H - h / 2
    else:
        y1 = rng.uniform(k["head"][1] - 0.05 * H, k["hip"][1] + 0.05 * H) - h / 2
    pb = _approx_box(p)
    gap = rng.uniform(0.12, 0.6) * H
    x1 = pb[2] + gap if d > 0 else pb[0] - gap - w
    obj["pts"]["p1"] = np.array([x1, y1])
    obj["pts"]["p2"] = np.array([x1 + w, y1 + h])
    return [p, obj], [(0, 1)], []


def _fly(rng, H, name="kite"):
    d = int(rng.choice([-1, 1]))
    p = _new_person((0.0, 0.0), H, d)
    k = p["pts"]
    k["hand_a"] = k["shoulder"] + np.array([d * 0.16 * H, -0.18 * H])
    k["elbow_a"] = k["shoulder"] + np.array([d * 0.13 * H, -0.04 * H])
    kite = _new_object(name, _obj_width(rng, name, H), int(rng.choice([-1, 1])))
    tail = k["hand_a"] + np.array([d * rng.uniform(0.25, 0.7) * H, -rng.uniform(0.3, 0.55) * H])
    w, h = kite["pts"]["p2"] - kite["pts"]["p1"]
    kite["pts"]["p1"] = tail - np.array([0.5 * w, 0.7 * h])
    kite["pts"]["p2"] = kite["pts"]["p1"] + np.array([w, h])
    string = {"kind": "string", "pts": {"a": k["hand_a"].copy(), "b": tail}, "colour": (50, 50, 50)}
    return [string, kite, p], [(2, 1)], []


def _shake_hand(rng, H, name="person"):
    a = _new_person((0.0, 0.0), H, 1)
    Hb = H * rng.uniform(0.9, 1.1)
    D = rng.uniform(0.42, 0.52) * H
    b = _new_person((D, 0.44 * (H - Hb)), Hb, -1)
    m = (a["pts"]["shoulder"] + b["pts"]["shoulder"]) / 2 + np.array([0.0, 0.14 * H])
    for q, s in ((a, -1), (b, 1)):
        q["pts"]["hand_a"] = m + np.array([s * 0.01 * H, 0.0])
        q["pts"]["elbow_a"] = _bend(q["pts"]["shoulder"], q["pts"]["hand_a"], H, 0.05)
    return [a, b], [(0, 1), (1, 0)], []


_INTERACTIONS = {"ride": _ride, "sit_on": _sit_on, "hold": _hold, "kick": _kick,
                 "look_at": _look_at, "fly": _fly, "shake_hand": _shake_hand}


def _idle_person(rng, H, name=None):
    """Distractor: a person doing nothing; faces the camera, or looks sideways (a gaze
    region towards the image border is then reserved: no object may lie there)."""
    d = int(rng.choice([-1, 1]))
    side = rng.random() < 0.3
    p = _new_person((0.0, 0.0), H, d, facing=("right" if d > 0 else "left") if side else "front")
    k = p["pts"]
    if rng.random() < 0.4:  # hands on the hips
        for s, sg in (("a", d), ("b", -d)):
            k["hand_" + s] = k["hip"] + np.array([sg * 0.1 * H, -0.03 * H])
            k["elbow_" + s] = k["shoulder"] + np.array([sg * 0.17 * H, 0.13 * H])
    gaze = []
    if side:
        hy = k["head"][1]
        gaze.append(np.array([k["head"][0], hy - 0.5 * H, d * 1e4, hy + 0.5 * H]))
    return [p], [], gaze


def _idle_object(rng, H, name):
    """Distractor: an object on its own."""
    o = _new_object(name, _obj_width(rng, name, H), int(rng.choice([-1, 1])))
    if name == "chair":
        o["pts"]["p2"] = o["pts"]["p1"] + np.array([o["pts"]["p2"][0] - o["pts"]["p1"][0], 0.52 * H])
    return [o], [], []


def _near_miss(rng, H, name):
    """Hard negative: an object close to a person (2-6 px from the person's box, below
    the feet or beside the body) without any interaction cue."""
    ents, _, gaze = _idle_object(rng, H, name)
    o = ents[0]
    p = _new_person((0.0, 0.0), H, int(rng.choice([-1, 1])))
    pb = _approx_box(p)
    w, h = o["pts"]["p2"] - o["pts"]["p1"]
    gap = rng.uniform(2.0, 6.0)
    side = int(rng.choice([-1, 1]))
    x1 = pb[2] + gap if side > 0 else pb[0] - gap - w
    if name in ("bicycle", "horse", "chair", "bench"):
        y1 = p["pts"]["foot_a"][1] - h + rng.uniform(-0.03, 0.05) * H
    else:
        y1 = rng.uniform(pb[1], pb[3] - h)
    o["pts"]["p1"] = np.array([x1, y1])
    o["pts"]["p2"] = np.array([x1 + w, y1 + h])
    return [p, o], [], gaze


def _shift(ents, gaze, dx, dy):
    for e in ents:
        for key in e["pts"]:
            e["pts"][key] = e["pts"][key] + np.array([dx, dy])
    for g in gaze:
        g[[0, 2]] += dx
        g[[1, 3]] += dy


def _overlap(a, b, margin=0.0) -> bool:
    return (a[0] - margin < b[2] and b[0] - margin < a[2] and a[1] - margin < b[3]
            and b[1] - margin < a[3])


def _gaze_box(g):
    """Gaze region [x_head, y1, +-inf, y2] -> ordinary box."""
    x0, y1, x2, y2 = g
    return np.array([min(x0, x2), y1, max(x0, x2), y2])


# ---------------------------------------------------------------------------------------
# synthetic HOI world: layout, rendering, files
# ---------------------------------------------------------------------------------------

def _new_state():
    return {"entities": [], "pairs": [], "reserved": [], "gaze": [], "objboxes": []}


def _person_height(rng, S, verb=None):
    lo, hi = (0.26, 0.33) if verb == "fly" else (0.3, 0.42)
    return float(rng.uniform(lo, hi)) * S


def _try_place(rng, S, state, builder, name, verb=None, cls=None, tries=15) -> bool:
    """Build a group with ``builder`` and shift it to a random free spot: inside the image
    (1 px margin), 2 px away from every group already there, no object inside another
    person's gaze region and no object inside this group's gaze region."""
    for attempt in range(tries):
        if attempt % 3 == 0:  # a new group every 3rd try, else a new position only
            H = _person_height(rng, S, verb)
            ents, pairs, gaze = builder(rng, H, name)
            boxes = [_approx_box(e) for e in ents]
            cb = np.array([min(b[0] for b in boxes), min(b[1] for b in boxes),
                           max(b[2] for b in boxes), max(b[3] for b in boxes)])
            lo = 1.0 - cb[:2]
            hi = S - 1.0 - cb[2:]
        if (lo > hi).any():
            continue
        dx, dy = rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])
        off = np.array([dx, dy, dx, dy])
        cbs = cb + off
        if any(_overlap(cbs, r, 2.0) for r in state["reserved"]):
            continue
        objb = [b + off for e, b in zip(ents, boxes) if e["kind"] == "object"]
        gz = [_gaze_box(g + off) for g in gaze]
        if any(_overlap(b, g) for b in objb for g in state["gaze"]):
            continue
        if any(_overlap(b, g) for b in state["objboxes"] for g in gz):
            continue
        _shift(ents, gaze, dx, dy)
        base = len(state["entities"])
        state["entities"].extend(ents)
        state["pairs"].extend((base + i, base + j, cls) for i, j in pairs)
        state["reserved"].append(cbs)
        state["gaze"].extend(gz)
        state["objboxes"].extend(objb)
        return True
    return False


def _quotas(n, which):
    """Pairs per class for a split of n images (train: column 2, test: column 3)."""
    col, floor = (2, 1) if which == "train" else (3, 2)
    return [max(floor, int(round(c[col] * n / 1000.0))) for c in SYN_CLASSES]


_CHUNK = 250  # images laid out / rendered together (one worker task, one random stream)


def _assign_events(rng, n, quota):
    """Spread the interaction events of a split over its n images: every class gets exactly
    ``quota`` pairs (shake_hand events make two pairs), ~3% of the images get no event, the
    others 1-3. Returns the list of class indices of each image."""
    events = []
    for c, (verb, _, _, _) in enumerate(SYN_CLASSES):
        events += [c] * (int(math.ceil(quota[c] / 2)) if verb == "shake_hand" else quota[c])
    events = [events[i] for i in rng.permutation(len(events))]
    n_empty = int(round(0.03 * n)) if n >= 20 else 0
    nonempty = [int(i) for i in rng.permutation(n)[n_empty:]]
    assigned = [[] for _ in range(n)]
    for e, c in enumerate(events):
        if e < len(nonempty):
            assigned[nonempty[e]].append(c)
        else:
            free = [i for i in nonempty if len(assigned[i]) < 3]
            if not free:
                break
            assigned[free[int(rng.integers(len(free)))]].append(c)
    return assigned


def _layout_chunk(rng, assigned, S):
    """Layouts of a chunk of images: their events first (an event that does not fit is
    retried in random images of the chunk that have events), then distractors: a near miss
    (35%), 0-2 idle people, 0-3 lone objects."""
    n = len(assigned)
    states = [_new_state() for _ in range(n)]
    leftovers = []

    def place_event(st, c):
        verb, name, _, _ = SYN_CLASSES[c]
        return _try_place(rng, S, st, _INTERACTIONS[verb], name, verb, c)

    for i in range(n):
        for c in assigned[i]:
            if not place_event(states[i], c):
                leftovers.append(c)
    busy = [i for i in range(n) if assigned[i]] or list(range(n))
    for c in leftovers:
        for _ in range(50):
            if place_event(states[busy[int(rng.integers(len(busy)))]], c):
                break
    names = list(_OBJ_STYLE)
    for st in states:
        if rng.random() < 0.35:
            _try_place(rng, S, st, _near_miss, names[int(rng.integers(len(names)))], tries=8)
        for _ in range(int(rng.choice(3, p=[0.45, 0.4, 0.15]))):
            _try_place(rng, S, st, _idle_person, None, tries=8)
        for _ in range(int(rng.integers(0, 4))):
            _try_place(rng, S, st, _idle_object, names[int(rng.integers(len(names)))], tries=8)
    return states


def _noise_bank(S, seed):
    """int16 unit-variance noise (x 16) twice the image size; images take random windows."""
    r = np.random.default_rng(np.random.SeedSequence([int(seed), 99]))
    return np.rint(16 * r.standard_normal((2 * S, 2 * S, 3), dtype=np.float32)).astype(np.int16)


def _render(state, S, rng, noise=None):
    """Draw one layout -> (uint8 image [S, S, 3], painted box or None for each entity).
    Colours are drawn here: background gradient, clutter, clothes, objects, then noise."""
    c1 = rng.integers(40, 256, size=3).astype(np.float32)
    c2 = rng.integers(20, 236, size=3).astype(np.float32)
    t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]  # [S, 1, 1]
    col = (c1 * (1 - t) + c2 * t).astype(np.uint8)  # [S, 1, 3] vertical gradient
    img = Image.fromarray(np.repeat(col, S, axis=1))  # [S, S, 3]
    R = _Raster(img)
    for _ in range(int(rng.integers(4, 12))):  # clutter: bars, blocks and specks
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x, y = rng.uniform(0, S, size=2)
        kind = rng.random()
        if kind < 0.45:
            L, a = rng.uniform(4, 0.25 * S), rng.uniform(0, np.pi)
            R.segment((x, y), (x + L * np.cos(a), y + L * np.sin(a)), rng.uniform(1.0, 2.5), col)
        elif kind < 0.8:
            w, h = rng.uniform(2, 0.1 * S, size=2)
            R.rect(x, y, x + w, y + h, col)
        else:
            R.disc((x, y), rng.uniform(0.8, 2.0), col)
    boxes = []
    for e in state["entities"]:
        if e["kind"] == "string":
            R.segment(e["pts"]["a"], e["pts"]["b"], 1.0, e["colour"])
            boxes.append(None)
            continue
        R.begin()
        if e["kind"] == "person":
            _colour_person(rng, e)
            _draw_person(R, e)
        else:
            _colour_object(rng, e)
            _DRAW[e["name"]](R, e)
        ext = R.end()
        if ext is None:  # cannot happen for a group placed inside the image; be safe
            b = np.clip(_approx_box(e), 0, S)
            ext = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
        boxes.append([float(v) for v in ext])
    sigma = float(rng.uniform(2.0, 7.0))
    if noise is None:
        noise = _noise_bank(S, 0)
    oy, ox = rng.integers(0, noise.shape[0] - S + 1), rng.integers(0, noise.shape[1] - S + 1)
    win = noise[oy:oy + S, ox:ox + S]  # [S, S, 3] int16, unit variance x 16
    if rng.random() < 0.5:
        win = win[::-1]
    noisy = np.asarray(img, dtype=np.int16) + (win * sigma / 16.0).astype(np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8), boxes


def _simulate_detections(state, boxes, S, rng) -> dict:
    """A detector on one synthetic image: every person/object box found with prob. ~0.95,
    jittered (each coordinate + N(0, 0.04 * side), IoU mostly > 0.7), score ~0.55-0.99,
    2% wrong object label; 10% get a looser duplicate with a lower score; Poisson(0.6)
    false positives (random box, random label, score 0.05-0.5). Rounded to 2 decimals."""
    labels_world = [0] + [COCO80_NAMES.index(n) for n in _OBJ_STYLE]
    out_b, out_s, out_l = [], [], []

    def jitter(b, rel):
        w, h = b[2] - b[0], b[3] - b[1]
        j = np.array(b) + rng.normal(0, rel, size=4) * np.array([w, h, w, h])
        x1, x2 = sorted(np.clip(j[[0, 2]], 0, S))
        y1, y2 = sorted(np.clip(j[[1, 3]], 0, S))
        return [x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)]

    for e, b in zip(state["entities"], boxes):
        if b is None:
            continue
        if rng.random() < (0.04 if e["kind"] == "person" else 0.06):
            continue  # missed
        lab = int(e["label"])
        if lab != 0 and rng.random() < 0.02:
            lab = int(rng.choice(labels_world[1:]))
        s = float(np.clip(rng.normal(0.85, 0.1), 0.55, 0.99))
        out_b.append(jitter(b, 0.04))
        out_s.append(s)
        out_l.append(lab)
        if rng.random() < 0.1:
            out_b.append(jitter(b, 0.12))  # draws from rng before the score below
            out_s.append(s * rng.uniform(0.3, 0.7))
            out_l.append(lab)
    for _ in range(int(rng.poisson(0.6))):
        w, h = rng.uniform(6, 0.4 * S, size=2)
        x, y = rng.uniform(0, S - w), rng.uniform(0, S - h)
        out_b.append([x, y, x + w, y + h])
        out_s.append(float(rng.uniform(0.05, 0.5)))
        out_l.append(int(rng.choice(labels_world)))
    r2 = lambda v: round(float(v), 2)  # noqa: E731
    return {"boxes": [[r2(v) for v in b] for b in out_b], "scores": [r2(s) for s in out_s],
            "labels": out_l}


def _rows(state, boxes):
    """HICO-DET annotation entry of one image (one row per labelled pair)."""
    a = {"boxes_h": [], "boxes_o": [], "hoi": [], "object": [], "verb": []}
    for i_h, i_o, c in state["pairs"]:
        verb, name, _, _ = SYN_CLASSES[c]
        a["boxes_h"].append(boxes[i_h])
        a["boxes_o"].append(boxes[i_o])
        a["hoi"].append(int(c))
        a["object"].append(COCO80_NAMES.index(name))
        a["verb"].append(SYN_VERBS.index(verb))
    return a


def _scene(state) -> dict:
    """What one image shows, at image level (the caption's ground truth, captions.py):
    {"interactions": [class of each event, sorted], "objects": [names of the objects in no
    interaction, sorted], "persons": number of people in none}. A shake_hand event (two
    labelled pairs, one per direction) is one interaction."""
    ents = state["entities"]
    busy = {i for i_h, i_o, _ in state["pairs"] for i in (i_h, i_o)}
    events = {(min(i_h, i_o), max(i_h, i_o), c): int(c) for i_h, i_o, c in state["pairs"]}
    return {"interactions": sorted(events.values()),
            "objects": sorted(e["name"] for i, e in enumerate(ents) if e["kind"] == "object" and i not in busy),
            "persons": sum(1 for i, e in enumerate(ents) if e["kind"] == "person" and i not in busy)}


def synthetic_class_space() -> ClassSpace:
    """The synthetic world's ClassSpace (rare/unseen left empty: they depend on the files)."""
    return ClassSpace(
        name="synthetic", prompts=_syn_prompts(), object_names=list(COCO80_NAMES),
        hoi_object=[[COCO80_NAMES.index(c[1])] for c in SYN_CLASSES],
        hoi_verb=[SYN_VERBS.index(c[0]) for c in SYN_CLASSES], verb_names=list(SYN_VERBS))


def _syn_prompts():
    out = []
    for verb, name, _, _ in SYN_CLASSES:
        ob = name.replace("_", " ")
        out.append(f"a photo of a person {_VERB_ING[verb]} {article(ob)} {ob}")
    return out


def _write_png(path, img: np.ndarray):
    """Minimal PNG writer (8-bit RGB, "Up" row filter, zlib level 1): ~3x faster than PIL's
    encoder on these noisy images; any PNG reader opens it."""
    import struct
    import zlib

    h, w = img.shape[:2]
    rows = img.reshape(h, w * 3)
    up = np.empty((h, w * 3 + 1), dtype=np.uint8)
    up[:, 0] = 2  # filter type Up
    up[0, 1:] = rows[0]
    up[1:, 1:] = rows[1:] - rows[:-1]  # uint8 wrap-around = modulo 256, as PNG wants

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(up.tobytes(), 1)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def _make_chunk(task):
    """Lay out, render and save one chunk of images -> [(filename, annotation, detections)].
    Deterministic from (seed, split, chunk index), whichever process runs it."""
    img_dir, split, split_id, seed, S, start, assigned = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, 0, start]))
    states = _layout_chunk(rng, assigned, S)
    noise = _noise_bank(S, seed)
    out = []
    for k, st in enumerate(states):
        i = start + k
        r = np.random.default_rng(np.random.SeedSequence([seed, split_id, 1, i]))
        img, boxes = _render(st, S, r, noise)
        fname = f"synth_{split}_{i:06d}.png"
        _write_png(Path(img_dir) / fname, img)
        d = np.random.default_rng(np.random.SeedSequence([seed, split_id, 2, i]))
        out.append((fname, _rows(st, boxes), _simulate_detections(st, boxes, S, d), _scene(st)))
    return out


def _drop_rows(anns: list, frac: float, K: int, seed: int) -> None:
    """Remove round(frac * n_k) of the n_k (pair, class) rows of each class k from the
    annotation entries ``anns`` in place (rows chosen uniformly by a stream of ``seed``)."""
    img = np.concatenate([np.full(len(a["hoi"]), i, dtype=np.int64) for i, a in enumerate(anns)]
                         + [np.zeros(0, dtype=np.int64)])  # [R] image of each row
    row = np.concatenate([np.arange(len(a["hoi"]), dtype=np.int64) for a in anns]
                         + [np.zeros(0, dtype=np.int64)])  # [R] row within its image
    hoi = np.concatenate([np.asarray(a["hoi"], dtype=np.int64) for a in anns]
                         + [np.zeros(0, dtype=np.int64)])  # [R]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, 4]))
    gone = np.zeros(len(hoi), dtype=bool)  # [R]
    for k in range(K):
        idx = np.nonzero(hoi == k)[0]
        n_drop = int(round(frac * len(idx)))
        if n_drop:
            gone[rng.choice(idx, size=n_drop, replace=False)] = True
    for i in np.unique(img[gone]):
        keep = set(row[(img == i) & ~gone].tolist())
        a = anns[i]
        for key in list(a):
            a[key] = [v for j, v in enumerate(a[key]) if j in keep]


def make_synthetic_world(root, n_train=2000, n_test=500, image_size=128, seed=0,
                         workers=None, verbose=False, train_label_drop: float = 0.0) -> dict:
    """Write the synthetic HOI world under ``root`` and return its paths:

    {"root", "train_images", "test_images", "train_anno", "test_anno",
     "train_detections", "test_detections", "train_scenes", "test_scenes"} (str). Files:
    root/images/{train,test}/synth_{split}_{i:06d}.png, root/instances_{train,test}.json
    (HICO-DET format + ``prompts``, ``zero_shot``, ``name``), root/detections_{split}.json
    (per-image detection format), root/scenes_{split}.json ({"filenames", "scenes"}: what each
    image shows at image level, every interaction drawn whether labelled or not, see _scene;
    the caption pretraining of world/pretrain_vlm.py reads it). Deterministic from ``seed`` (identical bytes, whatever
    ``workers``: chunks of 250 images have their own random streams).
    workers: processes rendering chunks in parallel (default min(4, cpu count); <= 1: none).
    train_label_drop: fraction in [0, 1) of the TRAIN (pair, class) annotation rows removed
    from instances_train.json only, as in sparsely annotated real data (HICO-DET leaves many
    real interactions unlabelled, so training pushes them to zero as negatives). The pixels
    and the simulated detections still show every interaction; the test file's annotations
    stay complete. Stratified per class: exactly round(train_label_drop * n_k) of the n_k
    rows of class k are removed, chosen by their own random stream (seeded by ``seed``), so
    nothing else in the world changes. Images left without a row go to ``empty``; ``rare``
    / ``non_rare`` (both files) count the REMAINING train rows (< 10 -> rare). 0 (default):
    no row removed, files byte-identical to a world made without the option.
    """
    S = int(image_size)
    if S < 64:
        raise ValueError(f"image_size must be >= 64, got {S}")
    drop = float(train_label_drop)
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"train_label_drop must be in [0, 1), got {train_label_drop!r}")
    seed = int(seed)
    t0 = time.time()
    root = Path(root)
    paths = {"root": str(root)}
    tasks = []
    for split_id, (split, n) in enumerate((("train", int(n_train)), ("test", int(n_test)))):
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, 3]))
        assigned = _assign_events(rng, n, _quotas(n, split))
        for start in range(0, n, _CHUNK):
            tasks.append((str(img_dir), split, split_id, seed, S, start, assigned[start:start + _CHUNK]))
        paths[f"{split}_images"] = str(img_dir)
        paths[f"{split}_anno"] = str(root / f"instances_{split}.json")
        paths[f"{split}_detections"] = str(root / f"detections_{split}.json")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers > 1 and len(tasks) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as ex:
            chunks = list(ex.map(_make_chunk, tasks))
    else:
        chunks = [_make_chunk(t) for t in tasks]
    results = {"train": ([], [], {}), "test": ([], [], {})}
    scenes = {"train": [], "test": []}
    for t, chunk in zip(tasks, chunks):
        anns, files, dets = results[t[1]]
        for fname, ann, det, scene in chunk:
            files.append(fname)
            anns.append(ann)
            dets[fname] = det
            scenes[t[1]].append(scene)

    K = len(SYN_CLASSES)
    if drop > 0:
        _drop_rows(results["train"][0], drop, K, seed)
    train_counts = np.zeros(K, dtype=np.int64)
    for a in results["train"][0]:
        train_counts += np.bincount(np.asarray(a["hoi"], dtype=np.int64), minlength=K)
    rare = [k for k in range(K) if train_counts[k] < 10]
    non_rare = [k for k in range(K) if train_counts[k] >= 10]
    for split, (anns, files, dets) in results.items():
        doc = {
            "annotation": anns,
            "filenames": files,
            "empty": [i for i, a in enumerate(anns) if not a["hoi"]],
            "objects": list(COCO80_NAMES),
            "verbs": list(SYN_VERBS),
            "correspondence": [[k, COCO80_NAMES.index(c[1]), SYN_VERBS.index(c[0])]
                               for k, c in enumerate(SYN_CLASSES)],
            "size": [[S, S] for _ in files],
            "rare": rare,
            "non_rare": non_rare,
            "prompts": _syn_prompts(),
            "zero_shot": {k: list(v) for k, v in SYN_ZERO_SHOT.items()},
            "name": "synthetic",
        }
        atomic_write_text(paths[f"{split}_anno"], json.dumps(doc, separators=(",", ":")))
        atomic_write_text(paths[f"{split}_detections"], json.dumps(dets, separators=(",", ":")))
        paths[f"{split}_scenes"] = str(root / f"scenes_{split}.json")
        atomic_write_text(paths[f"{split}_scenes"], json.dumps({"filenames": files, "scenes": scenes[split]},
                                                               separators=(",", ":")))
    if verbose:
        print(f"synthetic world: {n_train} + {n_test} images of {S}x{S} in "
              f"{time.time() - t0:.1f} s -> {root}")
    return paths
