"""Image-level captions of the synthetic HOI world, the text a CLIP-style VLM is pretrained on.

A real CLIP learned from web captions what "a person riding a horse" looks like, including
interactions a zero-shot HOI split hides from HOI training. The world's captions therefore
cover EVERY interaction class (zero-shot ones too), plus objects nobody interacts with and
people doing nothing:

    caption({"interactions": [1, 4], "objects": ["kite"], "persons": 2})
    -> "a photo of a person riding a horse, a person holding a cup, a kite and two people standing"

`caption(gt)` (no seed) is the canonical caption (held-out retrieval uses it); `caption(gt, seed)`
picks a template, shuffles the phrases and leaves out some non-interaction phrases, as web
captions are partial (training draws a new one every epoch).

Ground truth per image: {"interactions": [class index per event], "objects": [names of lone
objects], "persons": number of people in no interaction}. A shake_hand event (two labelled
pairs, one per direction) is one phrase. `caption_world` draws a world with
synthetic.make_synthetic_world and reads this ground truth from its scenes_test.json.
"""
import functools
from pathlib import Path

import numpy as np

from common import atomic_write_json, read_json
from data import article
from world.synthetic import SYN_ZERO_SHOT, make_synthetic_world, synthetic_class_space

TEMPLATES = ["a photo of {}", "a picture of {}", "an image of {}", "a scene with {}"]
EMPTY = "an empty scene"
DROP_EXTRA = 0.25  # chance that a seeded caption leaves out one lone-object / idle-person phrase
_NUMBERS = ["no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_PLURAL = {"person": "people", "bench": "benches"}


@functools.lru_cache(maxsize=1)
def _phrases() -> tuple:
    prefix = "a photo of "
    prompts = synthetic_class_space().prompts
    assert all(p.startswith(prefix) for p in prompts), "synthetic prompts changed their template"
    return tuple(p[len(prefix):] for p in prompts)


def class_phrases() -> list:
    """One phrase per interaction class, the HOI prompt without its "a photo of " prefix, so the
    captions speak the words LINK's classifier prompts use: "a person riding a bicycle", ..."""
    return list(_phrases())


def _counted(name: str, n: int) -> str:
    """("sports_ball", 2) -> "two sports balls"; ("umbrella", 1) -> "an umbrella"."""
    word = name.replace("_", " ")
    if n == 1:
        return f"{article(word)} {word}"
    last = word.split(" ")[-1]
    plural = word[: len(word) - len(last)] + _PLURAL.get(last, last + "s")
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else 'many'} {plural}"


def _join(phrases: list) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(gt: dict, seed=None) -> str:
    """Caption of one image's ground truth (see the module docstring).

    seed None: template 0, interactions in class order, then lone objects (counted, by name),
    then idle people, nothing left out. seed int: template, phrase order and which of the
    non-interaction phrases are dropped (each with chance DROP_EXTRA) come from the seed.
    """
    phrases = class_phrases()
    inter = [phrases[c] for c in sorted(int(c) for c in gt.get("interactions", []))]
    names = sorted(gt.get("objects", []))
    extra = [_counted(n, names.count(n)) for n in dict.fromkeys(names)]
    if gt.get("persons", 0):
        extra.append(_counted("person", int(gt["persons"])) + " standing")
    template = TEMPLATES[0]
    if seed is not None:
        rng = np.random.default_rng(seed)
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        extra = [e for e, keep in zip(extra, rng.random(len(extra)) >= DROP_EXTRA) if keep]
        inter = inter + extra
        parts = [inter[i] for i in rng.permutation(len(inter))]
    else:
        parts = inter + extra
    return template.format(_join(parts) if parts else EMPTY)


def caption_world(root, n: int, seed: int, image_size: int = 128, reuse: bool = False) -> tuple:
    """Draw n images with synthetic.make_synthetic_world under root (its "test" split, whose
    classes are far less long-tailed than "train": every class >= 30 pairs per 1000 images) and
    return (image paths [n], scenes [n]) from the world's scenes_test.json. reuse: keep a world
    already drawn there with the same seed, image count and size (recorded beside it;
    make_synthetic_world is deterministic, so it would draw the same bytes). A folder that is
    neither empty nor marked by caption_world.json (e.g. a user's HOI world) is refused:
    ValueError naming it."""
    root = Path(root)
    stamp = root / "caption_world.json"
    key = {"seed": int(seed), "n": int(n), "image_size": int(image_size)}
    if root.is_dir() and any(root.iterdir()) and not stamp.is_file():
        raise ValueError(f"{root}: not empty and not a caption world (no caption_world.json): drawing here "
                         f"would overwrite its files; choose an empty or new folder")
    if not (reuse and stamp.is_file() and read_json(stamp) == key and (root / "scenes_test.json").is_file()):
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stamp, {"drawing": key})  # ours from now on, reusable only once drawn
        make_synthetic_world(root, n_train=0, n_test=n, image_size=image_size, seed=seed)
        atomic_write_json(stamp, key)
    doc = read_json(root / "scenes_test.json")
    return [str(root / "images" / "test" / f) for f in doc["filenames"]], doc["scenes"]


__all__ = ["caption", "class_phrases", "caption_world", "TEMPLATES", "SYN_ZERO_SHOT"]
