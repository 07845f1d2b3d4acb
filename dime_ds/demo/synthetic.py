"""A procedurally drawn world for the demo and the tests: coloured shapes on plain backgrounds.

Every sample draws from its own `numpy.random.default_rng([seed, split_id, index])`, so any sample
can be regenerated alone and nothing depends on shard size. `write_world` writes, under one root:

- `images/`       unpaired images (jpg + json scene attributes), no captions: the distillation images.
                  A `duplicate_fraction` share are near-duplicates of another image (json
                  `duplicate_of`): its pixels with sensor noise of their own, re-encoded at another
                  JPEG quality, as a re-upload is; what semantic balance should find.
- `texts/`        the unpaired text corpus (txt + json), shuffled, of three kinds:
    describing    a grammar sentence about one distinct, randomly chosen image of `images/`;
    other_scene   visual sentences about things `images/` never contains. Half (even-numbered ones)
                  describe a held-out shape/colour combination (`HELD_OUT`: shape i never appears
                  in colour (i + 3) mod |colours| in `images/`, first or second object), half describe
                  real-world objects the world never draws ("a red car on a busy street");
    nonvisual     sentences from a non-visual grammar ("the meeting was moved to thursday").
  With `head_skew` > 0 the describing sentences are head-heavy: several may describe one image,
  and shape k of SHAPES is described with weight (k + 1) ** -head_skew (circles dominate, rings are
  the tail).
- `metadata.txt`  the world's concept list for MetaCLIP curation, one entry a line: shapes, colours,
                  sizes, backgrounds, and the distractor vocabulary (unseen objects, places, the
                  non-visual grammar's words).
- `metadata_objects.txt`  the same without the attribute words (colours, sizes, positions,
                  backgrounds): what a sentence is about, for balancing over objects.
- `paired/`       fresh scenes with captions (jpg + txt + json), for a teacher or a CLIP baseline.
- `eval/shape/`, `eval/colour/`  single-object images, class-balanced (label = index mod classes),
                  jpg + cls + json, and classnames.txt.
- `eval/captions/` fresh scenes with two captions each (txt, one per line): image-text retrieval.
- `world.json`    config, counts, class names, shards with sha256; written last, so it marks a
                  complete world.

Held-out combinations are excluded from `images/` only: `paired/` and `eval/` draw every
combination, so a teacher knows what the held-out sentences mean and the eval sets stay complete.

CLI: `python -m dime_ds.demo.synthetic [--out DIR] [--force] [hydra overrides...]`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dime_ds import atomic
from dime_ds.config.demo_schema import SyntheticConfig
from dime_ds.data.shards import ShardWriter, sha256_file
from dime_ds.errors import UserError

FORMAT_VERSION = 7  # 2: eval sets carry templates.txt; 3: shape prompts name colours; 4: eval/captions;
# 5: metadata.txt, head_skew, duplicate_fraction; 6: a duplicate is its source's pixels, noised and re-encoded;
# 7: metadata_objects.txt
JPEG_QUALITY = 90
DUPLICATE_NOISE_STD, DUPLICATE_JPEG_QUALITY = 4.0, 85  # a near-duplicate's own noise and re-encoding

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {  # fixed RGB, far apart from each other and from the backgrounds' hues
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 210),
    "pink": (250, 120, 190),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = {"gray": (128, 128, 128), "white": (240, 240, 240), "black": (25, 25, 25), "beige": (225, 210, 175)}
BACKGROUND_NOISE_STD = 6.0
SIZES = {"small": 0.10, "large": 0.19}  # object radius as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
JITTER = 0.02  # random shift of an object's centre, fraction of the side
GAP = 0.03  # minimal free space between two objects' nominal outlines
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges

HELD_OUT = frozenset((shape, COLOUR_NAMES[(i + 3) % len(COLOUR_NAMES)]) for i, shape in enumerate(SHAPES))

# Split ids of the per-sample seeds; TEXT_PLAN seeds the corpus layout (kinds, targets, order).
SPLIT_IDS = {"images": 0, "texts": 1, "paired": 2, "eval_shape": 3, "eval_colour": 4, "text_plan": 5,
             "eval_captions": 6, "duplicates": 7, "duplicate_plan": 8}
CONFIG_FIELDS = {
    "seed": int, "image_size": int, "n_images": int, "n_texts": int, "describing_fraction": float,
    "n_paired": int, "n_eval": int, "shard_size": int, "second_object_p": float,
    "head_skew": float, "duplicate_fraction": float,
}


class SyntheticConfigError(UserError, ValueError):
    """A `data.synthetic` section whose counts or ranges cannot make a world."""


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------- scenes

def _sample_object(rng, excluded=frozenset(), avoid: dict | None = None) -> tuple[str, str]:
    """A (shape, colour) pair outside `excluded`, differing in both from `avoid` (rejection is cheap:
    most pairs are allowed)."""
    while True:
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOUR_NAMES)
        if (shape, colour) in excluded:
            continue
        if avoid is not None and (shape == avoid["shape"] or colour == avoid["colour"]):
            continue
        return shape, colour


def _free_slots(first: dict) -> list[tuple[str, str]]:
    """(position, size) pairs where a second object keeps clear of the first."""
    fx, fy = POSITIONS[first["position"]]
    slots = []
    for pos, (x, y) in POSITIONS.items():
        if pos == first["position"]:
            continue
        for size, radius in SIZES.items():
            if math.hypot(x - fx, y - fy) >= SIZES[first["size"]] + radius + GAP:
                slots.append((pos, size))
    return slots


def sample_scene(rng: np.random.Generator, second_object_p: float = 0.3, excluded=frozenset()) -> dict:
    """Scene attributes: background and one or two objects (shape, colour, size, position)."""
    background = _pick(rng, tuple(BACKGROUNDS))
    shape, colour = _sample_object(rng, excluded)
    size, position = _pick(rng, tuple(SIZES)), _pick(rng, tuple(POSITIONS))
    first = {"shape": shape, "colour": colour, "size": size, "position": position}
    objects = [first]
    if rng.random() < second_object_p:
        slots = _free_slots(first)
        if not slots:  # a large centred object leaves no room: shrink it rather than skip
            first["size"] = "small"
            slots = _free_slots(first)
        position, size = _pick(rng, slots)
        shape2, colour2 = _sample_object(rng, excluded, avoid=first)
        objects.append({"shape": shape2, "colour": colour2, "size": size, "position": position})
    return {"background": background, "objects": objects}


def single_object_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> dict:
    """One object; the given attributes are fixed, the others drawn (eval sets, held-out sentences)."""
    background = _pick(rng, tuple(BACKGROUNDS))
    obj = {
        "shape": shape if shape is not None else _pick(rng, SHAPES),
        "colour": colour if colour is not None else _pick(rng, COLOUR_NAMES),
        "size": _pick(rng, tuple(SIZES)),
        "position": _pick(rng, tuple(POSITIONS)),
    }
    return {"background": background, "objects": [obj]}


def image_scene(seed: int, index: int, second_object_p: float) -> dict:
    """The scene image `index` draws first (a near-duplicate shows its source's scene instead)."""
    return sample_scene(sample_rng(seed, "images", index), second_object_p, HELD_OUT)


def duplicate_plan(c: dict) -> dict[int, int]:
    """{duplicate image index: its source}: a `duplicate_fraction` share of the images, each copying
    an image that is no duplicate itself. Empty for the default world."""
    n_dup = round(c["n_images"] * c["duplicate_fraction"])
    if not n_dup:
        return {}
    if n_dup >= c["n_images"]:
        raise SyntheticConfigError(f"duplicate_fraction={c['duplicate_fraction']} leaves no original image")
    rng = np.random.default_rng([c["seed"], SPLIT_IDS["duplicate_plan"]])
    order = rng.permutation(c["n_images"])
    duplicates, originals = np.sort(order[:n_dup]), order[n_dup:]
    return {int(d): int(s) for d, s in zip(duplicates, rng.choice(originals, size=n_dup))}


def _scene_of(c: dict, index: int, duplicates: dict[int, int]) -> dict:
    return image_scene(c["seed"], duplicates.get(index, index), c["second_object_p"])


def image_scenes(cfg: SyntheticConfig) -> list[dict]:
    """The scene of every unpaired image, in index order (a near-duplicate shows its source's): what
    the images show, without the noise and jitter each rendering draws."""
    c = config_values(cfg)
    duplicates = duplicate_plan(c)
    return [_scene_of(c, i, duplicates) for i in range(c["n_images"])]


# -------------------------------------------------------------------------------------- rendering

def _regular_polygon(cx: float, cy: float, r: float, n: int, start_deg: float = -90.0) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + 360.0 * k / n) for k in range(n)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        h = 0.5 * r
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=0)
    elif shape == "square":
        h = 0.85 * r  # a square's area close to the circle's
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, 1.1 * r, 3), fill=255)
    elif shape == "star":
        outer, inner = _regular_polygon(cx, cy, 1.05 * r, 5), _regular_polygon(cx, cy, 0.45 * r, 5, -54.0)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    elif shape == "cross":
        t = 0.32 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _background(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    # Mild per-pixel noise, so a background is not one flat colour a model could key on.
    pixels = np.asarray(BACKGROUNDS[name], dtype=np.float32) + rng.normal(0.0, BACKGROUND_NOISE_STD, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _object_mask(obj: dict, size: int, rng: np.random.Generator) -> Image.Image:
    big = size * SUPERSAMPLE
    fx, fy = POSITIONS[obj["position"]]
    jx, jy = rng.uniform(-JITTER, JITTER, 2)
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), obj["shape"], (fx + jx) * big, (fy + jy) * big, SIZES[obj["size"]] * big)
    return mask.resize((size, size), Image.Resampling.BOX)


def render_scene(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image_size x image_size picture of `scene`; noise and jitter come from `rng`."""
    image = _background(scene["background"], image_size, rng)
    for obj in scene["objects"]:  # later objects on top
        image.paste(COLOURS[obj["colour"]], (0, 0, image_size, image_size), _object_mask(obj, image_size, rng))
    return image


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def near_duplicate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A re-upload of `image`: the same pixels with fresh noise (re-encoded by the caller at
    DUPLICATE_JPEG_QUALITY). Not re-rendered: a re-rendering moves the objects, and the demo
    teacher, a tiny ViT on 64 px, tells a one-pixel shift apart as well as two different scenes."""
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, DUPLICATE_NOISE_STD, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------- grammar

_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_PREFIXES = ("", "", "a photo of ", "a picture of ", "an image of ", "there is ")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: dict, rng: np.random.Generator) -> str:
    words = [obj["size"]] if rng.random() < 0.5 else []
    return _article(" ".join(words + [obj["colour"], obj["shape"]]))


def _background_phrase(name: str, rng: np.random.Generator) -> str:
    return _pick(rng, ("on a {} background", "against a {} background")).format(name)


def caption(scene: dict, rng: np.random.Generator) -> str:
    """A sentence about `scene`: always the first object's colour and shape; size, position, the
    second object and the background are mentioned at random, in one of several phrasings."""
    objects = scene["objects"]
    prefix = _pick(rng, _PREFIXES)
    with_position = rng.random() < 0.6
    mentioned = objects if len(objects) > 1 and rng.random() < 0.75 else objects[:1]
    parts = []
    for obj in mentioned:
        phrase = _object_phrase(obj, rng)
        if with_position:
            phrase += " " + _pick(rng, _POSITION_PHRASES[obj["position"]])
        parts.append(phrase)
    joiner = " and " if with_position or rng.random() < 0.5 else " next to "
    text = prefix + joiner.join(parts)
    if rng.random() < 0.3:
        text += " " + _background_phrase(scene["background"], rng)
    return text


# Real-world things the world never draws; vehicles and objects may get a colour word.
_UNSEEN_COLOURABLE = ("car", "bicycle", "boat", "house", "bus", "umbrella", "chair", "kite", "truck", "door")
_UNSEEN_PLAIN = ("dog", "cat", "horse", "bird", "cow", "child", "tree", "sandwich", "guitar", "laptop")
_PLACES = ("on a beach", "in a park", "on a busy street", "in a kitchen", "near a lake", "in the snow",
           "in a field", "in front of a house", "on a wooden table")


def _unseen_thing(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        thing = _pick(rng, _UNSEEN_COLOURABLE)
        if rng.random() < 0.6:
            thing = _pick(rng, COLOUR_NAMES) + " " + thing
        return _article(thing)
    return _article(_pick(rng, _UNSEEN_PLAIN))


def unseen_object_sentence(rng: np.random.Generator) -> str:
    """A visual sentence about real-world objects absent from the world ("a red car in a park")."""
    template = _pick(rng, ("{a} {place}", "a photo of {a} {place}", "a close-up of {a}", "{a} and {b} {place}",
                           "a picture of {a}"))
    return template.format(a=_unseen_thing(rng), b=_unseen_thing(rng), place=_pick(rng, _PLACES))


_NONVISUAL_SLOTS = {
    "event": ("meeting", "budget review", "interview", "workshop", "board call", "dentist appointment", "team offsite"),
    "day": ("monday", "tuesday", "wednesday", "thursday", "friday", "next week", "the end of the month"),
    "goods": ("fuel", "housing", "grain", "electricity", "coffee", "insurance"),
    "trend": ("rose", "fell", "stalled", "climbed", "dropped"),
    "period": ("this quarter", "this year", "last month", "over the summer"),
    "person": ("my manager", "the new director", "our accountant", "the lawyer", "my sister", "the professor"),
    "doc": ("report", "contract", "invoice", "proposal", "schedule", "thesis"),
    "task": ("renew the license", "file the taxes", "reply to the email", "book the flights", "pay the rent"),
    "abstract": ("argument", "plan", "theory", "policy", "decision", "strategy"),
    "judgement": ("convincing", "too risky", "overdue", "unfair", "surprisingly popular", "hard to justify"),
    "outcome": ("approved", "rejected", "postponed", "debated"),
}
_NONVISUAL_TEMPLATES = (
    "the {event} was moved to {day}",
    "{goods} prices {trend} again {period}",
    "{person} said the {doc} would be ready by {day}",
    "please remember to {task} before {day}",
    "the committee {outcome} the proposal after a long debate",
    "{person} thinks the {abstract} is {judgement}",
    "we need to {task} by {day}",
    "the {doc} was {outcome} {period}",
    "inflation {trend} {period} according to {person}",
)


def nonvisual_sentence(rng: np.random.Generator) -> str:
    """A sentence no image can ground: no colour, shape, size or position words."""
    template = _pick(rng, _NONVISUAL_TEMPLATES)
    return template.format(**{slot: _pick(rng, words) for slot, words in _NONVISUAL_SLOTS.items()})


def metadata_entries(attributes: bool = True) -> list[str]:
    """The world's concepts for MetaCLIP curation (`metadata.txt`), in a fixed order, each once:
    what it draws (shapes, colours, sizes, positions, backgrounds) and the distractor vocabulary.
    attributes=False (`metadata_objects.txt`) leaves out the colours, sizes, positions and
    backgrounds: MetaCLIP keeps a sentence outright when any entry it matches is a tail one, so
    attribute words, which every describing sentence carries, blunt a balancing over the objects."""
    places = [p.split(" ", 1)[1].removeprefix("a ").removeprefix("the ").removeprefix("front of a ")
              for p in _PLACES]
    attribute_groups = [COLOUR_NAMES, tuple(SIZES), tuple(POSITIONS), ("middle",), tuple(BACKGROUNDS)]
    groups = [SHAPES, *(attribute_groups if attributes else ()), _UNSEEN_COLOURABLE, _UNSEEN_PLAIN, places,
              *_NONVISUAL_SLOTS.values()]
    return list(dict.fromkeys(entry for group in groups for entry in group))


# ----------------------------------------------------------------------------------------- splits

Sample = tuple[str, dict[str, bytes]]
EVAL_CLASSNAMES = {"shape": list(SHAPES), "colour": list(COLOUR_NAMES)}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def image_key(index: int) -> str:
    return f"image-{index:07d}"


def _image_samples(c: dict) -> Iterator[Sample]:
    duplicates = duplicate_plan(c)
    for i in range(c["n_images"]):
        if i in duplicates:  # the source's pixels (its own rng redrawn), noise of its own
            source = duplicates[i]
            rng = sample_rng(c["seed"], "images", source)
            scene = sample_scene(rng, c["second_object_p"], HELD_OUT)
            meta = {**scene, "duplicate_of": image_key(source)}
            copy = near_duplicate(render_scene(scene, c["image_size"], rng), sample_rng(c["seed"], "duplicates", i))
            jpg = encode_jpeg(copy, DUPLICATE_JPEG_QUALITY)
        else:
            rng = sample_rng(c["seed"], "images", i)
            scene = meta = sample_scene(rng, c["second_object_p"], HELD_OUT)
            jpg = encode_jpeg(render_scene(scene, c["image_size"], rng))
        yield image_key(i), {"jpg": jpg, "json": _json_bytes(meta)}


def _describing_targets(c: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """Images the describing sentences are about: n distinct ones uniformly, or with head_skew > 0
    drawn with replacement, shape k weighted (k + 1) ** -head_skew."""
    if c["head_skew"] <= 0:
        return rng.choice(c["n_images"], size=n, replace=False) if n else np.zeros(0, np.int64)
    duplicates = duplicate_plan(c)
    shapes = np.array([SHAPES.index(_scene_of(c, i, duplicates)["objects"][0]["shape"]) for i in range(c["n_images"])])
    share = (np.arange(len(SHAPES)) + 1.0) ** -c["head_skew"]
    per_image = share[shapes] / np.bincount(shapes, minlength=len(SHAPES))[shapes]
    return rng.choice(c["n_images"], size=n, replace=True, p=per_image / per_image.sum())


def text_plan(c: dict) -> list[tuple[str, Any]]:
    """The corpus layout, in corpus order: ("describing", image index), ("other_scene", source) or
    ("nonvisual", None). Drawn from its own seed, so each sentence can be regenerated alone."""
    n_describing = round(c["n_texts"] * c["describing_fraction"])
    if n_describing > c["n_images"] and c["head_skew"] <= 0:
        raise SyntheticConfigError(f"{n_describing} describing sentences need as many distinct images, "
                         f"but n_images={c['n_images']}; lower describing_fraction or n_texts")
    n_distractors = c["n_texts"] - n_describing
    n_other = (n_distractors + 1) // 2
    rng = np.random.default_rng([c["seed"], SPLIT_IDS["text_plan"]])
    targets = _describing_targets(c, n_describing, rng)
    entries = [("describing", int(t)) for t in targets]
    entries += [("other_scene", "held_out_combination" if j % 2 == 0 else "unseen_object") for j in range(n_other)]
    entries += [("nonvisual", None)] * (n_distractors - n_other)
    return [entries[p] for p in rng.permutation(len(entries))]


def _text_sentence(c: dict, k: int, kind: str, arg: Any, duplicates: dict[int, int]) -> tuple[str, dict]:
    rng = sample_rng(c["seed"], "texts", k)
    if kind == "describing":
        scene = _scene_of(c, arg, duplicates)
        return caption(scene, rng), {"kind": kind, "image_key": image_key(arg)}
    if kind == "other_scene" and arg == "held_out_combination":
        shape, colour = _pick(rng, sorted(HELD_OUT))
        return caption(single_object_scene(rng, shape, colour), rng), {"kind": kind, "source": arg}
    if kind == "other_scene":
        return unseen_object_sentence(rng), {"kind": kind, "source": arg}
    return nonvisual_sentence(rng), {"kind": kind}


def _text_samples(c: dict) -> Iterator[Sample]:
    duplicates = duplicate_plan(c)
    for k, (kind, arg) in enumerate(text_plan(c)):
        sentence, meta = _text_sentence(c, k, kind, arg, duplicates)
        yield f"text-{k:07d}", {"txt": sentence.encode("utf-8"), "json": _json_bytes(meta)}


def _paired_samples(c: dict) -> Iterator[Sample]:
    for i in range(c["n_paired"]):
        rng = sample_rng(c["seed"], "paired", i)
        scene = sample_scene(rng, c["second_object_p"])
        jpg = encode_jpeg(render_scene(scene, c["image_size"], rng))
        text = caption(scene, rng)
        yield f"pair-{i:07d}", {"jpg": jpg, "txt": text.encode("utf-8"), "json": _json_bytes(scene)}


def _caption_samples(c: dict) -> Iterator[Sample]:
    """Fresh scenes, each with two differently phrased captions (one per line): retrieval."""
    for i in range(c["n_eval"]):
        rng = sample_rng(c["seed"], "eval_captions", i)
        scene = sample_scene(rng, c["second_object_p"])
        jpg = encode_jpeg(render_scene(scene, c["image_size"], rng))
        text = "\n".join(caption(scene, rng) for _ in range(CAPTIONS_PER_IMAGE))
        yield f"captions-{i:07d}", {"jpg": jpg, "txt": text.encode("utf-8"), "json": _json_bytes(scene)}


CAPTIONS_PER_IMAGE = 2
METADATA, METADATA_OBJECTS = "metadata.txt", "metadata_objects.txt"


def _eval_samples(c: dict, task: str) -> Iterator[Sample]:
    classnames = EVAL_CLASSNAMES[task]
    for i in range(c["n_eval"]):
        rng = sample_rng(c["seed"], f"eval_{task}", i)
        label = i % len(classnames)  # balanced classes
        fixed = {task: classnames[label]}
        scene = single_object_scene(rng, **fixed)
        jpg = encode_jpeg(render_scene(scene, c["image_size"], rng))
        meta = {"label": label, "classname": classnames[label], "scene": scene}
        yield f"{task}-{i:07d}", {"jpg": jpg, "cls": str(label).encode("ascii"), "json": _json_bytes(meta)}


# Zero-shot prompts per eval set, in the captions' own phrasing (which always name a colour and a
# shape). Each set's prompts are averaged over every value of the other attribute (prompt
# ensembling), so the classifier asks about shape alone, or colour alone.
EVAL_TEMPLATES = {
    "shape": [f"a {colour} {{}}." for colour in COLOURS],
    "colour": [f"a {{}} {shape}." for shape in SHAPES],
}


# split name -> (directory under the root, sample count key, generator)
_SPLITS: dict[str, tuple[str, str, Callable[[dict], Iterator[Sample]]]] = {
    "images": ("images", "n_images", _image_samples),
    "texts": ("texts", "n_texts", _text_samples),
    "paired": ("paired", "n_paired", _paired_samples),
    "eval_shape": ("eval/shape", "n_eval", lambda c: _eval_samples(c, "shape")),
    "eval_colour": ("eval/colour", "n_eval", lambda c: _eval_samples(c, "colour")),
    "eval_captions": ("eval/captions", "n_eval", _caption_samples),
}


# ------------------------------------------------------------------------------------------ world

def config_values(cfg: SyntheticConfig) -> dict:
    """The generator's knobs of a `data.synthetic` section (DictConfig or dataclass)."""
    values = {name: cast(getattr(cfg, name)) for name, cast in CONFIG_FIELDS.items()}
    if values["image_size"] < 8 or values["shard_size"] < 1 or values["seed"] < 0:
        raise SyntheticConfigError(f"synthetic config needs image_size >= 8, shard_size >= 1, seed >= 0: {values}")
    if not 0.0 <= values["describing_fraction"] <= 1.0 or not 0.0 <= values["second_object_p"] <= 1.0:
        raise SyntheticConfigError(f"describing_fraction and second_object_p must lie in [0, 1]: {values}")
    return values


def _existing_world(out: Path, values: dict) -> dict | None:
    path = out / "world.json"
    if not path.is_file():
        return None
    try:
        world = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if world.get("format_version") != FORMAT_VERSION or world.get("config") != values:
        return None
    shards = [s["path"] for entries in world.get("shards", {}).values() for s in entries]
    return world if all((out / p).is_file() for p in shards) else None


def _clear_split(directory: Path) -> None:
    # Stale shards from an older world would be picked up by directory listing.
    if directory.is_dir():
        for path in list(directory.glob("shard-*.tar")) + list(directory.glob("shard-*.tar.tmp")):
            path.unlink()


def _write_split(out: Path, name: str, c: dict, progress: bool | None) -> list[dict]:
    subdir, count_key, samples = _SPLITS[name]
    directory = out / subdir
    _clear_split(directory)
    with ShardWriter(directory, prefix="shard", maxcount=c["shard_size"]) as writer:
        bar = tqdm(samples(c), total=c[count_key], desc=name, unit="sample",
                   disable=None if progress is None else not progress)
        for key, fields in bar:
            writer.write(key, fields)
    return [
        {"path": Path(p).relative_to(out).as_posix(), "sha256": sha256_file(p), "samples": n}
        for p, n in zip(writer.paths, writer.counts)
    ]


def write_world(out_dir: str | os.PathLike, cfg: SyntheticConfig, force: bool = False,
                progress: bool | None = None) -> dict:
    """Write the world under `out_dir` and return its world.json content. A complete world with the
    same config is kept as is (unless `force`). progress: None = bars only on a terminal."""
    out = Path(out_dir).expanduser().resolve()
    c = config_values(cfg)
    if not force and (world := _existing_world(out, c)) is not None:
        return world
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)  # the world is incomplete until rewritten

    plan = text_plan(c)  # validates the corpus layout before any image is drawn
    kinds = {kind: sum(1 for k, _ in plan if k == kind) for kind in ("describing", "other_scene", "nonvisual")}
    shards = {name: _write_split(out, name, c, progress) for name in _SPLITS}
    for task, classnames in EVAL_CLASSNAMES.items():
        atomic.write_text(out / "eval" / task / "classnames.txt", "\n".join(classnames) + "\n")
        atomic.write_text(out / "eval" / task / "templates.txt", "\n".join(EVAL_TEMPLATES[task]) + "\n")
    atomic.write_text(out / METADATA, "\n".join(metadata_entries()) + "\n")
    atomic.write_text(out / METADATA_OBJECTS, "\n".join(metadata_entries(attributes=False)) + "\n")

    world = {
        "format_version": FORMAT_VERSION,
        "generator": "dime_ds.demo.synthetic",
        "seed": c["seed"],
        "config": c,
        "counts": {**{name: c[_SPLITS[name][1]] for name in _SPLITS}, **kinds},
        "classnames": EVAL_CLASSNAMES,
        "held_out_combinations": sorted(list(pair) for pair in HELD_OUT),
        "duplicates": {image_key(d): image_key(src) for d, src in duplicate_plan(c).items()},
        "metadata": METADATA,
        "metadata_objects": METADATA_OBJECTS,
        "shards": shards,
    }
    atomic.write_json(out / "world.json", world, indent=2, sort_keys=True)
    return world


def summary_lines(world: dict, out_dir: str | os.PathLike) -> list[str]:
    lines = []
    for name, (subdir, _, _) in _SPLITS.items():
        entries = world["shards"][name]
        lines.append(f"{name:12s} {sum(e['samples'] for e in entries):7d} samples in {len(entries):3d} shards  "
                     f"{Path(out_dir) / subdir}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dime_ds.demo.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="world directory (default: data.root of the config)")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical world exists")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data.synthetic.n_images=100")
    args = parser.parse_args(argv)

    from dime_ds.config import load_config  # late: keeps `import dime_ds.demo.synthetic` light

    cfg = load_config(["schema=demo", *args.overrides])  # the demo's schema holds data.synthetic
    out = Path(args.out or cfg.data.root)
    world = write_world(out, cfg.data.synthetic, force=args.force)
    for line in summary_lines(world, out.resolve()):
        print(line)
    return 0


if __name__ == "__main__":
    from dime_ds.cli import run_entry

    sys.exit(run_entry(main))
