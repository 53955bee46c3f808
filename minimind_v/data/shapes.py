"""The shapes world: a synthetic, fully checkable stand-in for the MiniMind-V dataset.

Each picture is 224x224 RGB with 1 to 3 flat-coloured objects on a near-white background.
Objects sit in distinct cells of a 3x3 grid, so every object has a unique position name.
From each scene we write

- captions for stage-1 pretraining   (pretrain_data.json + pretrain_images/),
- question/answer turns for SFT      (sft_data.json + sft_images/),
- a held-out question set            (eval_data.json + eval_data_images/),
- a few named pictures for a chat demo (eval_images/),

in exactly the original v1 dataset layout (SFT pictures stored as
``sft_images/COCO_train2014_<image>``, the name v1's SFT loader opens), so the same training code
reads either; or, with ``--format parquet``, in the original's current layout: one parquet file
per split (pretrain_i2t.parquet, sft_i2t.parquet, eval_i2t.parquet) whose rows hold the
conversation (a JSON string of role/content turns) and the picture's bytes (PNG, the same bytes
as the files of the JSON layout). Every caption and every answer is derived from the scene, and
`answer` (`answer_two_pictures` for questions about two pictures) re-derives an answer by
parsing the question, so every answer can be checked.

Objects are sized so that even a small one spans more than one 32-pixel patch of CLIP ViT-B/32:
a shape narrower than a patch collapses into a single patch token and its outline is lost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES_WORLD_VERSION = 1

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
# Row-major over the 3x3 grid: POSITIONS[3 * row + col].
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
ANSWER_TYPES = ("colour", "shape", "size", "position", "count")
# Questions whose answer may be "no" or "nothing": the model must learn to say what is not there.
EXTRA_ANSWER_TYPES = ("existence", "absent", "relation")
# Questions about two pictures at once ("Which picture has more circles?" -> "the first", "the
# second" or "neither"; "Do both pictures hold a red shape?" -> "yes" / "no"): records with two
# pictures, one <image> tag each. Off by default: the default world stays as it was.
TWO_PICTURES = "two_pictures"
TWO_PICTURE_ANSWERS = ("the first", "the second", "neither")
# The name v1's SFT loader opens for a record's image (sft_images/COCO_train2014_<image>).
ORIGINAL_SFT_PREFIX = "COCO_train2014_"
FORMATS = ("json", "parquet")
# Grid relations, by (row, column) of the 3x3 grid: "left of" means in a column further left,
# whatever the row; "above" means in a row higher up, whatever the column.
RELATIONS = ("left of", "right of", "above", "below")

# Far apart in RGB so even a small encoder separates them; no anti-aliasing, so these exact
# values are the pixels inside each object.
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND_RGB = (250, 250, 250)
# Width and height of the object's box at 224 px. Both exceed one 32-px patch; a large
# object still fits inside its ~74-px cell with a few pixels to spare.
SIZE_PIXELS = {"small": 42, "large": 64}
REFERENCE_IMAGE_SIZE = 224
CELL_MARGIN = 2  # pixels kept free at each cell border, so neighbours never touch
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURAL_SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SINGULAR = {plural: shape for shape, plural in PLURAL_SHAPES.items()}

CAPTION_REQUESTS = (
    "Describe this picture briefly.",
    "Write a short but informative summary of the image.",
    "What is in this image?",
    "Give a brief description of the picture.",
    "Caption this image.",
    "What does the picture show?",
)
CAPTION_TEMPLATES = (
    "{List}.",
    "There is {list}.",
    "The picture shows {list}.",
    "This image shows {list}.",
    "{Count}: {list}.",
)
# {ref} is a noun phrase naming exactly one object, {pos} a position phrase ("in the top left"),
# {plural} a counted noun ("circles", "red objects").
QUESTION_TEMPLATES = {
    "colour": (
        "What colour is {ref}?",
        "What color is {ref}?",
        "What is the colour of {ref}?",
        "Which colour is {ref}?",
        "Tell me the colour of {ref}.",
    ),
    "shape": (
        "What shape is {ref}?",
        "What is the shape of {ref}?",
        "Which shape is {ref}?",
    ),
    "shape_at": (
        "What is {pos}?",
        "What shape is {pos}?",
        "Which shape can you see {pos}?",
    ),
    "size": (
        "Is {ref} small or large?",
        "Is {ref} large or small?",
        "How big is {ref}?",
        "What size is {ref}?",
    ),
    "position": (
        "Where is {ref}?",
        "Where is {ref} located?",
        "In which part of the picture is {ref}?",
        "Where can you see {ref}?",
    ),
    "count": (
        "How many {plural} are there?",
        "How many {plural} can you see?",
        "How many {plural} are in the picture?",
        "Count the {plural} in the image.",
    ),
    "existence": (
        "Is there {desc}?",
        "Can you see {desc}?",
        "Does the picture show {desc}?",
    ),
    "relation": (
        "What shape is {rel} {ref}?",
        "Which shape is {rel} {ref}?",
    ),
    "relation_yes_no": (
        "Is {ref} {rel} {ref2}?",
    ),
}
TWO_PICTURE_TEMPLATES = {
    "more": (
        "Which picture has more {plural}?",
        "Which of the two pictures has more {plural}?",
    ),
    "both": (
        "Do both pictures hold {desc}?",
        "Do both pictures show {desc}?",
    ),
}


MAX_SFT_TURNS = 10


@dataclass
class ShapesWorldConfig:
    seed: int = 0
    n_pretrain: int = 20_000
    n_sft: int = 20_000
    n_eval: int = 1_000
    n_eval_images: int = 8
    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 3
    # Each SFT record asks min_sft_turns..max_sft_turns questions about its image. Long records
    # teach the most per step: the 50 image tokens are paid once, each further turn ~18 tokens.
    min_sft_turns: int = 6
    max_sft_turns: int = 8
    workers: int = 0  # processes that render images; 0 = one per CPU core
    png_compress_level: int = 1  # fast to write; the flat images stay small anyway
    # The kinds of question SFT and the held-out set ask: ANSWER_TYPES, plus any of
    # EXTRA_ANSWER_TYPES (yes/no existence, questions about absent objects, grid relations), plus
    # TWO_PICTURES (records with two pictures; a share 1/len(question_types) of SFT records and of
    # the held-out questions).
    question_types: tuple = ANSWER_TYPES
    # Colour-shape pairs ("red", "circle") that no training picture, caption or question shows;
    # the held-out set then mixes pictures with them ("unseen") and without ("seen").
    held_out_pairs: tuple = ()
    unseen_eval_fraction: float = 0.5  # of the held-out questions, when held_out_pairs is set

    def validate(self) -> None:
        for name in ("n_pretrain", "n_sft", "n_eval", "n_eval_images", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesWorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(
                f"ShapesWorldConfig needs 1 <= min_objects <= max_objects <= {len(POSITIONS)}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 1 <= self.min_sft_turns <= self.max_sft_turns <= MAX_SFT_TURNS:
            raise ValueError(f"ShapesWorldConfig needs 1 <= min_sft_turns <= max_sft_turns <= {MAX_SFT_TURNS}, "
                             f"got min_sft_turns={self.min_sft_turns}, max_sft_turns={self.max_sft_turns}")
        if self.image_size < 96:
            raise ValueError(f"ShapesWorldConfig.image_size must be >= 96 pixels, got {self.image_size}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"ShapesWorldConfig.png_compress_level must be in 0..9, got {self.png_compress_level}")
        known = ANSWER_TYPES + EXTRA_ANSWER_TYPES + (TWO_PICTURES,)
        if not self.question_types or any(k not in known for k in self.question_types) \
                or len(set(self.question_types)) != len(self.question_types):
            raise ValueError(f"ShapesWorldConfig.question_types must be distinct kinds among {known}, "
                             f"got {self.question_types!r}")
        if not single_picture_types(self.question_types):
            raise ValueError(f"ShapesWorldConfig.question_types needs a kind about one picture besides "
                             f"{TWO_PICTURES!r}, got {self.question_types!r}")
        for pair in self.held_out_pairs:
            if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
                raise ValueError(f"ShapesWorldConfig.held_out_pairs: {pair!r} is not a (colour, shape) pair "
                                 f"with a colour in {COLOURS} and a shape in {SHAPES}")
        if len({tuple(p) for p in self.held_out_pairs}) == len(COLOURS) * len(SHAPES):
            raise ValueError("ShapesWorldConfig.held_out_pairs holds every colour-shape pair: nothing is left to train on")
        if not 0 < self.unseen_eval_fraction < 1:
            raise ValueError(f"ShapesWorldConfig.unseen_eval_fraction must be in (0, 1), got {self.unseen_eval_fraction}")


# ----------------------------------------------------------------------------- scenes


def max_offset(size: str) -> int:
    """How far (pixels at 224) an object of this size may move from its cell centre."""
    cell = REFERENCE_IMAGE_SIZE / 3
    return int((cell - SIZE_PIXELS[size]) // 2) - CELL_MARGIN


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> list[dict]:
    """1..3 objects in distinct grid cells, listed in reading order (top left to bottom right)."""
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    scene = []
    for cell in cells:
        size = rng.choice(SIZES)
        m = max_offset(size)
        scene.append({
            "shape": rng.choice(SHAPES),
            "colour": rng.choice(COLOURS),
            "size": size,
            "position": POSITIONS[cell],
            "offset": [rng.randint(-m, m), rng.randint(-m, m)],  # jitter (dx, dy), pixels at 224
        })
    return scene


def scene_key(scene: list[dict], image_size: int = REFERENCE_IMAGE_SIZE) -> tuple:
    """Everything that decides the pixels: equal keys give identical images, and so do equal pictures.

    The drawn box, not the offset: offsets that the cell's margin clamps to the same place draw
    the same picture, and must count as the same picture.
    """
    return tuple(sorted((o["shape"], o["colour"], o["position"], object_box(o, image_size)) for o in scene))


def validate_scene(scene: list[dict], where: str = "scene") -> None:
    if not isinstance(scene, list) or not scene:
        raise ValueError(f"{where}: expected a non-empty list of objects, got {scene!r}")
    seen = set()
    for i, o in enumerate(scene):
        for field, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            if o.get(field) not in allowed:
                raise ValueError(f"{where}[{i}].{field}: expected one of {allowed}, got {o.get(field)!r}")
        if o["position"] in seen:
            raise ValueError(f"{where}[{i}]: two objects share the position {o['position']!r}")
        seen.add(o["position"])


def object_box(obj: dict, image_size: int = 224) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of one object, kept inside its grid cell."""
    row, col = divmod(POSITIONS.index(obj["position"]), 3)
    scale = image_size / REFERENCE_IMAGE_SIZE
    cx0, cx1 = round(col * image_size / 3), round((col + 1) * image_size / 3) - 1
    cy0, cy1 = round(row * image_size / 3), round((row + 1) * image_size / 3) - 1
    side = round(SIZE_PIXELS[obj["size"]] * scale)
    dx, dy = obj.get("offset", (0, 0))
    x0 = round((cx0 + cx1 + 1) / 2 + dx * scale - side / 2)
    y0 = round((cy0 + cy1 + 1) / 2 + dy * scale - side / 2)
    # Rounding at other image sizes may push a pixel over the margin; clamp into the cell.
    margin = max(1, round(CELL_MARGIN * scale))
    x0 = min(max(x0, cx0 + margin), cx1 - margin - side + 1)
    y0 = min(max(y0, cy0 + margin), cy1 - margin - side + 1)
    return x0, y0, x0 + side - 1, y0 + side - 1


def render_scene(scene: list[dict], image_size: int = 224) -> Image.Image:
    """Draw the scene: filled, unsmoothed shapes in their exact colours on a near-white ground."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        x0, y0, x1, y1 = object_box(obj, image_size)
        fill = COLOUR_RGB[obj["colour"]]
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":  # pointing up, base on the box's bottom edge
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        elif shape == "cross":  # a plus sign whose arms are a third of the box wide
            side = x1 - x0 + 1
            arm = round(side / 3)
            a0 = x0 + (side - arm) // 2
            b0 = y0 + (side - arm) // 2
            draw.rectangle((x0, b0, x1, b0 + arm - 1), fill=fill)
            draw.rectangle((a0, y0, a0 + arm - 1, y1), fill=fill)
        else:
            raise ValueError(f"render_scene: unknown shape {shape!r}; expected one of {SHAPES}")
    return img


# ----------------------------------------------------------------------------- language


def position_phrase(position: str) -> str:
    """'top left' -> 'in the top left', 'top' -> 'at the top', 'left' -> 'on the left'."""
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def describe_object(obj: dict) -> str:
    """'large red circle'"""
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: list[dict], rng: random.Random) -> str:
    """One sentence naming every object's size, colour, shape and position, objects in random order.

    Not in reading order: then the decoder learns to describe a picture by scanning the patches
    from top left to bottom right, and never to look an object up by what it is. In random order,
    saying where "a small red circle" is means finding that circle among the patches."""
    parts = [f"a {describe_object(o)} {position_phrase(o['position'])}" for o in rng.sample(scene, len(scene))]
    listing = _join(parts)
    n = len(scene)
    count = f"{NUMBER_WORDS[n].capitalize()} object{'s' if n > 1 else ''}"
    template = rng.choice(CAPTION_TEMPLATES)
    return template.format(list=listing, List=listing[0].upper() + listing[1:], Count=count)


def _matches(obj: dict, constraints: dict) -> bool:
    return all(obj[k] == v for k, v in constraints.items())


def _noun_phrase(constraints: dict, rng: random.Random, allow_shape_noun: bool) -> str:
    words = [constraints[k] for k in ("size", "colour") if k in constraints]
    if "shape" in constraints:
        words.append(constraints["shape"])
    else:
        words.append(rng.choice(("object", "shape")) if allow_shape_noun else "object")
    phrase = "the " + " ".join(words)
    if "position" in constraints:
        phrase += " " + position_phrase(constraints["position"])
    return phrase


def _references(scene: list[dict], obj: dict, asked: str) -> tuple[list[dict], list[dict]]:
    """Attribute sets that pick out `obj` alone without naming the asked attribute:
    (descriptive ones from size/colour/shape, positional ones)."""
    free = [a for a in ("size", "colour", "shape") if a != asked]
    descriptive = []
    for mask in range(1, 1 << len(free)):
        constraints = {a: obj[a] for i, a in enumerate(free) if mask >> i & 1}
        if sum(_matches(o, constraints) for o in scene) == 1:
            descriptive.append(constraints)
    positional = []
    if asked != "position":
        positional.append({"position": obj["position"]})
        if asked != "shape":
            positional.append({"shape": obj["shape"], "position": obj["position"]})
    return descriptive, positional


def _attribute_question(scene: list[dict], rng: random.Random, asked: str) -> tuple[str, str, str] | None:
    order = list(range(len(scene)))
    rng.shuffle(order)
    for i in order:
        obj = scene[i]
        descriptive, positional = _references(scene, obj, asked)
        if not descriptive and not positional:
            continue  # e.g. two identical objects: neither can be told apart except by position
        if descriptive and (not positional or rng.random() < 0.6):
            constraints = rng.choice(descriptive)
        else:
            constraints = rng.choice(positional)
        if asked == "shape" and set(constraints) == {"position"} and rng.random() < 0.5:
            question = rng.choice(QUESTION_TEMPLATES["shape_at"]).format(pos=position_phrase(obj["position"]))
        else:
            ref = _noun_phrase(constraints, rng, allow_shape_noun=asked != "shape")
            question = rng.choice(QUESTION_TEMPLATES[asked]).format(ref=ref)
        return question, obj[asked], asked
    return None


def _count_question(scene: list[dict], rng: random.Random) -> tuple[str, str, str]:
    # Every countable noun phrase, grouped by its count; only attributes present in the scene.
    by_count: dict[int, list[str]] = {}
    by_count.setdefault(len(scene), []).append("objects")
    for kind in ("shape", "colour", "size"):
        for value in sorted({o[kind] for o in scene}):
            plural = PLURAL_SHAPES[value] if kind == "shape" else f"{value} objects"
            by_count.setdefault(sum(o[kind] == value for o in scene), []).append(plural)
    # Draw the count first, then a phrase: otherwise "one" would dominate, since most
    # attribute values occur once in a scene.
    n = rng.choice(sorted(by_count))
    question = rng.choice(QUESTION_TEMPLATES["count"]).format(plural=rng.choice(by_count[n]))
    return question, NUMBER_WORDS[n], "count"


def single_picture_types(kinds) -> tuple:
    """The kinds of question about one picture (all but TWO_PICTURES)."""
    return tuple(k for k in kinds if k != TWO_PICTURES)


def questions(scene: list[dict], rng: random.Random, kinds: tuple = ANSWER_TYPES) -> list[tuple[str, str, str]]:
    """One unambiguous (question, answer, answer_type) per kind in ``kinds`` that this scene
    allows, in that order. "position" can be missing (when no object is unique without it), and
    so can "relation" (when every relation asked about has two answers). TWO_PICTURES is not
    about one scene: it is left out here (see ``two_picture_question``)."""
    out = []
    for asked in kinds:
        if asked == TWO_PICTURES:
            continue
        if asked == "count":
            qa = _count_question(scene, rng)
        elif asked == "existence":
            qa = _existence_question(scene, rng)
        elif asked == "absent":
            qa = _absent_question(scene, rng)
        elif asked == "relation":
            qa = _relation_question(scene, rng)
        else:
            qa = _attribute_question(scene, rng, asked)
        if qa is not None:
            out.append(qa)
    return out


# ----------------------------------------------------------------------------- saying "no" and "nothing"


def _indefinite(constraints: dict) -> str:
    """{"colour": "red", "shape": "circle"} -> 'a red circle'; no shape -> 'a red object'."""
    words = [constraints[k] for k in ("size", "colour") if k in constraints]
    return "a " + " ".join(words + [constraints.get("shape", "object")])


def _existence_question(scene: list[dict], rng: random.Random) -> tuple[str, str, str] | None:
    """"Is there a red circle?": "yes" for half, and "no" for a near miss of an object that is there
    (one attribute changed: a red square present, a blue circle present)."""
    template = rng.choice(QUESTION_TEMPLATES["existence"])
    obj = rng.choice(scene)
    if rng.random() < 0.5:
        kinds = rng.choice([("shape",), ("colour",), ("colour", "shape"), ("size", "shape"),
                            ("size", "colour", "shape")])
        return template.format(desc=_indefinite({k: obj[k] for k in kinds})), "yes", "existence"
    for _ in range(20):
        kinds = rng.choice([("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")])
        constraints = {k: obj[k] for k in kinds}
        changed = rng.choice(kinds)
        values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}[changed]
        constraints[changed] = rng.choice([v for v in values if v != obj[changed]])
        if not any(_matches(o, constraints) for o in scene):
            return template.format(desc=_indefinite(constraints)), "no", "existence"
    return None


def absent_answer(constraints: dict) -> str:
    """What to say when nothing fits: 'Nothing is in the center.' or 'There is no red triangle.'"""
    if set(constraints) == {"position"}:
        return f"Nothing is {position_phrase(constraints['position'])}."
    words = [constraints[k] for k in ("size", "colour") if k in constraints]
    phrase = " ".join(words + [constraints.get("shape", "object")])
    if "position" in constraints:
        phrase += " " + position_phrase(constraints["position"])
    return f"There is no {phrase}."


def _absent_question(scene: list[dict], rng: random.Random) -> tuple[str, str, str] | None:
    """An attribute question about an object that is not there ("What colour is the triangle?",
    "What shape is in the center?" with an empty centre): the answer says so."""
    asked = rng.choice(("colour", "shape", "size", "position"))
    empty = [p for p in POSITIONS if p not in {o["position"] for o in scene}]
    if asked == "shape" and empty and rng.random() < 0.5:
        position = rng.choice(empty)
        question = rng.choice(QUESTION_TEMPLATES["shape_at"]).format(pos=position_phrase(position))
        return question, absent_answer({"position": position}), "absent"
    free = [a for a in ("size", "colour", "shape") if a != asked]
    for _ in range(20):
        kinds = [a for a in free if rng.random() < 0.6] or [rng.choice(free)]
        constraints = {k: rng.choice({"shape": SHAPES, "colour": COLOURS, "size": SIZES}[k]) for k in kinds}
        if not any(_matches(o, constraints) for o in scene):
            ref = _noun_phrase(constraints, rng, allow_shape_noun=asked != "shape")
            return rng.choice(QUESTION_TEMPLATES[asked]).format(ref=ref), absent_answer(constraints), "absent"
    return None


def _cell(obj: dict) -> tuple[int, int]:
    return divmod(POSITIONS.index(obj["position"]), 3)  # (row, column)


def related(a: dict, relation: str, b: dict) -> bool:
    """Is object a ``relation`` ("left of", "right of", "above", "below") object b on the grid?"""
    (ra, ca), (rb, cb) = _cell(a), _cell(b)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def _relation_question(scene: list[dict], rng: random.Random) -> tuple[str, str, str] | None:
    """"What shape is left of the blue square?" (a shape, or "nothing") or "Is the circle above the
    cross?" (yes / no). Objects are named by descriptions that fit them alone."""
    named = [(o, descriptive) for o in scene for descriptive in [_references(scene, o, "")[0]] if descriptive]
    if not named:
        return None
    relation = rng.choice(RELATIONS)
    if len(named) >= 2 and rng.random() < 0.4:
        (a, ra), (b, rb) = rng.sample(named, 2)
        question = rng.choice(QUESTION_TEMPLATES["relation_yes_no"]).format(
            ref=_noun_phrase(rng.choice(ra), rng, True), rel=relation, ref2=_noun_phrase(rng.choice(rb), rng, True))
        return question, "yes" if related(a, relation, b) else "no", "relation"
    order = list(range(len(named)))
    rng.shuffle(order)
    for i in order:
        anchor, refs = named[i]
        found = [o for o in scene if o is not anchor and related(o, relation, anchor)]
        if len(found) <= 1:  # two objects in that direction would make two right answers
            question = rng.choice(QUESTION_TEMPLATES["relation"]).format(
                rel=relation, ref=_noun_phrase(rng.choice(refs), rng, True))
            return question, found[0]["shape"] if found else "nothing", "relation"
    return None


# ----------------------------------------------------------------------------- two pictures


def _count_in(scene: list[dict], constraints: dict) -> int:
    return sum(_matches(o, constraints) for o in scene)


def _countable(constraints: dict) -> str:
    """{"shape": "circle"} -> 'circles'; {"colour": "red"} -> 'red objects'."""
    return PLURAL_SHAPES[constraints["shape"]] if "shape" in constraints else f"{constraints['colour']} objects"


def _both_desc(constraints: dict) -> str:
    """{"colour": "red"} -> 'a red shape'; {"shape": "circle"} -> 'a circle'; both -> 'a red circle'."""
    words = [constraints["colour"]] if "colour" in constraints else []
    return "a " + " ".join(words + [constraints.get("shape", "shape")])


def two_picture_question(scenes: list[list[dict]], rng: random.Random) -> tuple[str, str, str]:
    """One question about two scenes: "Which picture has more circles?" ("the first", "the
    second", "neither") or "Do both pictures hold a red shape?" ("yes", "no"). The answer is drawn
    first, evenly, then a question that has it (when the scenes allow one)."""
    first, second = scenes
    nouns = [{"shape": v} for v in SHAPES] + [{"colour": v} for v in COLOURS]
    if rng.random() < 0.5:
        want = rng.choice(TWO_PICTURE_ANSWERS)
        by_answer = {a: [] for a in TWO_PICTURE_ANSWERS}
        for c in nouns:
            a, b = _count_in(first, c), _count_in(second, c)
            if a or b:  # "more circles" where neither has one would be a trick question
                by_answer["the first" if a > b else "the second" if b > a else "neither"].append(c)
        options = by_answer[want] or [c for a in TWO_PICTURE_ANSWERS for c in by_answer[a]]
        c = rng.choice(options)
        a, b = _count_in(first, c), _count_in(second, c)
        question = rng.choice(TWO_PICTURE_TEMPLATES["more"]).format(plural=_countable(c))
        return question, "the first" if a > b else "the second" if b > a else "neither", TWO_PICTURES
    want = rng.choice(("yes", "no"))
    descs = nouns + [{"colour": c, "shape": sh} for c in COLOURS for sh in SHAPES]
    by_answer = {"yes": [], "no": []}
    for c in descs:
        here = [_count_in(sc, c) > 0 for sc in scenes]
        if any(here):  # about something one of the pictures shows
            by_answer["yes" if all(here) else "no"].append(c)
    options = by_answer[want] or by_answer["no"] or by_answer["yes"]
    c = rng.choice(options)
    question = rng.choice(TWO_PICTURE_TEMPLATES["both"]).format(desc=_both_desc(c))
    return question, "yes" if all(_count_in(sc, c) > 0 for sc in scenes) else "no", TWO_PICTURES


_PLURAL_TWO = rf"(?:(?P<colour>{'|'.join(COLOURS)}) objects|(?P<shapes>{'|'.join(PLURAL_SHAPES.values())}))"
_DESC_TWO = rf"a (?:(?P<colour>{'|'.join(COLOURS)}) )?(?P<shape>{'|'.join(SHAPES + ('shape',))})"
_TWO_MORE_RE = [re.compile(re.escape(t).replace(re.escape("{plural}"), _PLURAL_TWO), re.IGNORECASE)
                for t in TWO_PICTURE_TEMPLATES["more"]]
_TWO_BOTH_RE = [re.compile(re.escape(t).replace(re.escape("{desc}"), _DESC_TWO), re.IGNORECASE)
                for t in TWO_PICTURE_TEMPLATES["both"]]


def answer_two_pictures(scenes: list[list[dict]], question: str) -> str:
    """Re-derive the answer to a two-picture question from the two scenes alone."""
    text = " ".join(question.replace("<image>", " ").split())
    if len(scenes) != 2:
        raise ValueError(f"answer_two_pictures: expected two scenes, got {len(scenes)}")
    for pattern in _TWO_MORE_RE:
        m = pattern.fullmatch(text)
        if m:
            c = {"colour": m["colour"].lower()} if m["colour"] else {"shape": SINGULAR[m["shapes"].lower()]}
            a, b = (_count_in(sc, c) for sc in scenes)
            return "the first" if a > b else "the second" if b > a else "neither"
    for pattern in _TWO_BOTH_RE:
        m = pattern.fullmatch(text)
        if m:
            c = {"colour": m["colour"].lower()} if m["colour"] else {}
            if m["shape"].lower() != "shape":
                c["shape"] = m["shape"].lower()
            return "yes" if all(_count_in(sc, c) > 0 for sc in scenes) else "no"
    raise ValueError(f"answer_two_pictures: not a two-picture question: {question!r}")


# ----------------------------------------------------------------------------- parsing answers



def _ALT(words) -> str:
    """Regex alternation, longest first, so 'top left' wins over 'top'."""
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))

def _pos_re(prefix: str = "") -> str:
    return rf"(?:in|at|on) the (?P<{prefix}position>{_ALT(POSITIONS)})"


def _ref_re(prefix: str = "") -> str:
    """'the large red circle in the top left': a definite reference to one object."""
    return (rf"the (?:(?P<{prefix}size>{_ALT(SIZES)}) )?(?:(?P<{prefix}colour>{_ALT(COLOURS)}) )?"
            rf"(?P<{prefix}noun>{_ALT(SHAPES + ('object', 'shape'))})(?: {_pos_re(prefix)})?")


_POS_RE = _pos_re()
_REF_RE = _ref_re()
_PLURAL_RE = (
    rf"(?:(?P<attr>{_ALT(SIZES + COLOURS)}) )?(?P<noun>{_ALT(tuple(PLURAL_SHAPES.values()) + ('objects',))})"
)
_DESC_RE = (  # 'a large red circle', 'a red object': what an existence question asks about
    rf"a (?:(?P<size>{_ALT(SIZES)}) )?(?:(?P<colour>{_ALT(COLOURS)}) )?(?P<noun>{_ALT(SHAPES + ('object',))})"
)
_REL_RE = rf"(?P<relation>{_ALT(RELATIONS)})"


def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"(\{ref\}|\{ref2\}|\{pos\}|\{plural\}|\{desc\}|\{rel\})", template)
    # In a two-object question the first reference is the subject, the second the anchor.
    two = "{ref2}" in pieces
    sub = {"{ref}": _ref_re("s_" if two else ""), "{ref2}": _ref_re(), "{pos}": _POS_RE,
           "{plural}": _PLURAL_RE, "{desc}": _DESC_RE, "{rel}": _REL_RE}
    return re.compile("".join(sub.get(p, re.escape(p)) for p in pieces), re.IGNORECASE)


_PARSERS = [
    (kind, _template_regex(t)) for kind, templates in QUESTION_TEMPLATES.items() for t in templates
]


def _constraints(groups: dict, prefix: str = "") -> dict:
    out = {k: groups[prefix + k] for k in ("size", "colour", "position") if prefix + k in groups}
    if groups.get(prefix + "noun") in SHAPES:
        out["shape"] = groups[prefix + "noun"]
    return out


_VOCABULARY = [(w, "<position>") for w in sorted(POSITIONS, key=len, reverse=True)] + \
    [(w, "<shapes>") for w in PLURAL_SHAPES.values()] + [(w, "<shape>") for w in SHAPES] + \
    [(w, "<colour>") for w in COLOURS] + [(w, "<size>") for w in SIZES]
_VOCABULARY_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w, _ in _VOCABULARY) + r")\b")


def question_form(question: str) -> str:
    """The question with its object words masked: 'What colour is the small circle?' ->
    'what colour is the <size> <shape>?'. Questions of one form differ only in what they name."""
    text = " ".join(question.replace("<image>", " ").lower().split())
    slots = dict(_VOCABULARY)
    return _VOCABULARY_RE.sub(lambda m: slots[m.group(1)], text)


def parse_question(question: str) -> tuple[str, dict]:
    """Question text (with or without <image>) -> (answer_type, constraints on the objects).
    A relation question gives {"relation", "anchor": constraints} and, for yes/no, "subject".
    Raises ValueError if it matches none of the templates."""
    text = " ".join(question.replace("<image>", " ").split())
    for kind, pattern in _PARSERS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        groups = {k: v.lower() for k, v in m.groupdict().items() if v is not None}
        if kind == "count":
            noun = groups["noun"]
            constraints = {}
            if noun != "objects":
                constraints["shape"] = next(s for s, p in PLURAL_SHAPES.items() if p == noun)
            if "attr" in groups:
                constraints["size" if groups["attr"] in SIZES else "colour"] = groups["attr"]
            return "count", constraints
        if kind == "relation":
            return "relation", {"relation": groups["relation"], "anchor": _constraints(groups)}
        if kind == "relation_yes_no":
            return "relation", {"relation": groups["relation"], "subject": _constraints(groups, "s_"),
                                "anchor": _constraints(groups)}
        return ("shape" if kind == "shape_at" else kind), _constraints(groups)
    raise ValueError(f"answer: not a shapes-world question: {question!r}")


def _the_one(scene: list[dict], constraints: dict, question: str) -> dict:
    found = [o for o in scene if _matches(o, constraints)]
    if len(found) != 1:
        raise ValueError(
            f"answer: {question!r} refers to {len(found)} objects of the scene {scene!r}; expected exactly one"
        )
    return found[0]


def answer(scene: list[dict], question: str, absent_ok: bool = False) -> str:
    """Re-derive the answer to a generated question from the scene alone.

    A question about an object that is not there raises ValueError, unless ``absent_ok`` (the
    worlds that ask such questions on purpose), where it gets ``absent_answer``. Unknown questions
    and references that fit several objects always raise."""
    kind, constraints = parse_question(question)
    if kind == "existence":
        return "yes" if any(_matches(o, constraints) for o in scene) else "no"
    if kind == "relation":
        anchor = _the_one(scene, constraints["anchor"], question)
        if "subject" in constraints:
            subject = _the_one(scene, constraints["subject"], question)
            return "yes" if related(subject, constraints["relation"], anchor) else "no"
        found = [o for o in scene if o is not anchor and related(o, constraints["relation"], anchor)]
        if len(found) > 1:
            raise ValueError(f"answer: {question!r} has {len(found)} answers in the scene {scene!r}")
        return found[0]["shape"] if found else "nothing"
    found = [o for o in scene if _matches(o, constraints)]
    if kind == "count":
        return NUMBER_WORDS[len(found)]
    if not found and absent_ok:
        return absent_answer(constraints)
    return _the_one(scene, constraints, question)[kind]


# ----------------------------------------------------------------------------- writing the world


def _human_turn(text: str, rng: random.Random) -> str:
    # The original data puts <image> before the question (SFT) or after it (pretraining); use both.
    return f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"


def _record(split: str, index: int, scene: list[dict], conversations: list[dict], **extra) -> dict:
    name = f"shapes_{split}_{index:06d}"
    return {"id": name, "image": f"{name}.png", "conversations": conversations, "scene": scene, **extra}


def _two_picture_record(split: str, index: int, scenes: list[list[dict]], conversations: list[dict],
                        **extra) -> dict:
    name = f"shapes_{split}_{index:06d}"
    return {"id": name, "image": [f"{name}_1.png", f"{name}_2.png"], "conversations": conversations,
            "scenes": scenes, **extra}


def record_scenes(record: dict) -> list[list[dict]]:
    """The scenes of a record's pictures, in the order of its images (one, or two)."""
    return record["scenes"] if "scenes" in record else [record["scene"]]


def record_images(record: dict) -> list[str]:
    """A record's image names, in the order of its <image> tags."""
    return record["image"] if isinstance(record["image"], list) else [record["image"]]


def _two_picture_turns(scenes: list[list[dict]], rng: random.Random, n: int,
                       cfg: ShapesWorldConfig) -> list[tuple[str, str, str]]:
    pool = {}
    for _ in range(8 * n):
        qa = two_picture_question(scenes, rng)
        if not names_held_out_pair(qa[0], cfg):
            pool.setdefault(qa[0], qa)
        if len(pool) >= n:
            break
    return list(pool.values())


def _pretrain_records(cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
    rng = random.Random(f"shapes-world/{cfg.seed}/pretrain")
    records = []
    for i in range(cfg.n_pretrain):
        scene = _fresh_scene(rng, cfg, held_out)
        conv = [
            {"from": "human", "value": _human_turn(rng.choice(CAPTION_REQUESTS), rng)},
            {"from": "gpt", "value": caption(scene, rng)},
        ]
        records.append(_record("pretrain", i, scene, conv))
    return records


def _sft_records(cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
    rng = random.Random(f"shapes-world/{cfg.seed}/sft")
    # Two-picture records come from their own stream: the one-picture records' draws are untouched.
    two = random.Random(f"shapes-world/{cfg.seed}/sft/two_pictures") if TWO_PICTURES in cfg.question_types else None
    records = []
    for i in range(cfg.n_sft):
        if two is not None and two.random() < 1 / len(cfg.question_types):
            scenes = [_fresh_scene(two, cfg, held_out) for _ in range(2)]
            turns = _two_picture_turns(scenes, two, two.randint(1, 3), cfg)
            conv = []
            for t, (q, a, _) in enumerate(turns):
                conv.append({"from": "human", "value": f"<image>\n<image>\n{q}" if t == 0 else q})
                conv.append({"from": "gpt", "value": a})
            records.append(_two_picture_record("sft", i, scenes, conv, answer_types=[k for _, _, k in turns]))
            continue
        scene = _fresh_scene(rng, cfg, held_out)
        turns = _distinct_questions(scene, rng, rng.randint(cfg.min_sft_turns, cfg.max_sft_turns), cfg)
        conv = []
        for t, (q, a, _) in enumerate(turns):
            conv.append({"from": "human", "value": _human_turn(q, rng) if t == 0 else q})
            conv.append({"from": "gpt", "value": a})
        records.append(_record("sft", i, scene, conv, answer_types=[k for _, _, k in turns]))
    return records


def _distinct_questions(scene: list[dict], rng: random.Random, n: int,
                        cfg: ShapesWorldConfig) -> list[tuple[str, str, str]]:
    """Up to n different questions about the scene, in random order. A type can come more than
    once (about another object, or in other words): each turn is more to learn from one picture."""
    pool = {}
    for _ in range(3):  # three rounds of one question per type are plenty for n <= 10
        for qa in questions(scene, rng, cfg.question_types):
            if not names_held_out_pair(qa[0], cfg):
                pool.setdefault(qa[0], qa)
    return rng.sample(list(pool.values()), min(n, len(pool)))


def _eval_records(cfg: ShapesWorldConfig) -> list[dict]:
    rng = random.Random(f"shapes-world/{cfg.seed}/eval")
    # Equal numbers of each answer type, in shuffled order.
    kinds = [cfg.question_types[i % len(cfg.question_types)] for i in range(cfg.n_eval)]
    rng.shuffle(kinds)
    records = []
    for i, kind in enumerate(kinds):
        # With held-out pairs, a share of the pictures shows one of them: the "unseen" split.
        unseen = bool(cfg.held_out_pairs) and rng.random() < cfg.unseen_eval_fraction
        if kind == TWO_PICTURES:
            scenes = []
            while len(scenes) < 2:
                scene = random_scene(rng, cfg.min_objects, cfg.max_objects)
                if not cfg.held_out_pairs or has_held_out_pair(scene, cfg) == unseen:
                    scenes.append(scene)
            q, a, _ = two_picture_question(scenes, rng)
            conv = [{"from": "human", "value": f"<image>\n<image>\n{q}"}, {"from": "gpt", "value": a}]
            extra = {"combination": "unseen" if unseen else "seen"} if cfg.held_out_pairs else {}
            records.append(_two_picture_record("eval", i, scenes, conv, answer_type=kind, **extra))
            continue
        while True:
            scene = random_scene(rng, cfg.min_objects, cfg.max_objects)
            if cfg.held_out_pairs and has_held_out_pair(scene, cfg) != unseen:
                continue
            # All kinds are drawn, as ever: the same seed must keep giving the same world.
            qa = [x for x in questions(scene, rng, cfg.question_types) if x[2] == kind]
            if qa:
                break
        q, a, _ = qa[0]
        conv = [{"from": "human", "value": _human_turn(q, rng)}, {"from": "gpt", "value": a}]
        extra = {"combination": "unseen" if unseen else "seen"} if cfg.held_out_pairs else {}
        records.append(_record("eval", i, scene, conv, answer_type=kind, **extra))
    return records


def has_held_out_pair(scene: list[dict], cfg: ShapesWorldConfig) -> bool:
    pairs = {tuple(p) for p in cfg.held_out_pairs}
    return any((o["colour"], o["shape"]) in pairs for o in scene)


def names_held_out_pair(text: str, cfg: ShapesWorldConfig) -> bool:
    """Does the text name a held-out colour-shape pair ('red circle', 'red circles')?"""
    words = text.lower().replace("?", " ").replace(".", " ").split()
    pairs = {tuple(p) for p in cfg.held_out_pairs}
    return any((a, SINGULAR.get(b, b)) in pairs for a, b in zip(words, words[1:]))


def _demo_images(cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
    """A few pictures named after their content, like the original eval_images/ folder."""
    rng = random.Random(f"shapes-world/{cfg.seed}/eval_images")
    demos, names = [], set()
    while len(demos) < cfg.n_eval_images:
        scene = random_scene(rng, cfg.min_objects, min(cfg.max_objects, 2))
        name = "_and_".join(describe_object(o).replace(" ", "_") for o in scene) + ".png"
        if name in names or scene_key(scene, cfg.image_size) in held_out or has_held_out_pair(scene, cfg):
            continue
        names.add(name)
        held_out.add(scene_key(scene, cfg.image_size))
        demos.append({"file": name, "scene": scene, "caption": caption(scene, rng)})
    return demos


def _fresh_scene(rng: random.Random, cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
    """A training scene whose picture is none of the held-out pictures, and shows no held-out pair."""
    while True:
        scene = random_scene(rng, cfg.min_objects, cfg.max_objects)
        if scene_key(scene, cfg.image_size) not in held_out and not has_held_out_pair(scene, cfg):
            return scene


def _render_job(job: tuple[str, list[dict], int, int]) -> None:
    path, scene, image_size, level = job
    render_scene(scene, image_size).save(path, format="PNG", compress_level=level)


def _render_bytes(job: tuple[list[dict], int, int]) -> bytes:
    """The PNG bytes _render_job writes to a file, in memory (for the parquet layout)."""
    import io

    scene, image_size, level = job
    buffer = io.BytesIO()
    render_scene(scene, image_size).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def stored_image_name(folder: str, name: str) -> str:
    """The file name a record's picture has in the JSON layout: SFT pictures carry v1's
    COCO_train2014_ prefix (v1's SFT loader opens sft_images/COCO_train2014_<image>)."""
    return ORIGINAL_SFT_PREFIX + name if folder == "sft_images" else name


def _write_json_atomic(path: Path, obj) -> None:
    """One record per line (readable, diff-able); temp file + rename so a crash never leaves half a file."""
    if isinstance(obj, list):
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n]\n"
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


SPLITS = (("pretrain_data.json", "pretrain_images", "pretrain_i2t.parquet"),
          ("sft_data.json", "sft_images", "sft_i2t.parquet"),
          ("eval_data.json", "eval_data_images", "eval_i2t.parquet"))
OUTPUT_FILES = ("pretrain_data.json", "sft_data.json", "eval_data.json", "world.json",
                "pretrain_i2t.parquet", "sft_i2t.parquet", "eval_i2t.parquet")
OUTPUT_DIRS = ("pretrain_images", "sft_images", "eval_data_images", "eval_images")


def _parquet_rows(records: list[dict], pictures):
    """Records -> rows of the original's parquet layout: role/content conversations, the pictures'
    bytes (in tag order), and the other fields of the record as columns (JSON strings)."""
    from .records import check_turns

    for record in records:
        messages = check_turns(record["conversations"], f"record {record['id']!r}", record["id"], image_tags="any")
        images = [next(pictures) for _ in record_images(record)]
        row = {"conversations": messages, "image_bytes": images if isinstance(record["image"], list) else images[0]}
        row.update({k: v for k, v in record.items() if k not in ("conversations", "image")})
        yield row


def _write_parquet_split(path: Path, records: list[dict], cfg: ShapesWorldConfig, pool, bar) -> None:
    from .parquet import write_chat_parquet

    jobs = [(scene, cfg.image_size, cfg.png_compress_level) for r in records for scene in record_scenes(r)]
    rendered = pool.imap(_render_bytes, jobs, chunksize=64) if pool is not None else map(_render_bytes, jobs)

    def counted():
        for picture in rendered:
            bar.update()
            yield picture

    several = any(isinstance(r["image"], list) for r in records)
    extra = sorted({k for r in records for k in r} - {"conversations", "image"}, key=lambda k: (k != "id", k))
    write_chat_parquet(path, _parquet_rows(records, counted()), several_pictures=several, extra_columns=extra)


def generate_world(out_dir, config: ShapesWorldConfig | None = None, progress: bool = True,
                   overwrite: bool = False, format: str = "json") -> dict:
    """Write a whole shapes world into out_dir and return a summary.

    format: "json" (the v1 layout: JSON records + image folders, SFT pictures named
    COCO_train2014_<image>) or "parquet" (the original's current layout: one parquet file per
    split, the pictures' PNG bytes in the rows; the same records). eval_images/ and world.json
    are written either way. Refuses a non-empty out_dir unless overwrite=True; even then only the
    files and folders this function writes are replaced, anything else there is left alone.
    """
    from tqdm.auto import tqdm

    cfg = config if config is not None else ShapesWorldConfig()
    cfg.validate()
    if format not in FORMATS:
        raise ValueError(f"generate_world: format must be one of {FORMATS}, got {format!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"generate_world: out_dir {str(out)!r} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"generate_world: out_dir {str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace "
                "the shapes-world files in it"
            )
        for name in OUTPUT_DIRS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # Held-out pictures first, so training scenes can avoid them pixel for pixel.
    eval_records = _eval_records(cfg)
    held_out = {scene_key(scene, cfg.image_size) for r in eval_records for scene in record_scenes(r)}
    demos = _demo_images(cfg, held_out)
    pretrain_records = _pretrain_records(cfg, held_out)
    sft_records = _sft_records(cfg, held_out)
    by_split = {"pretrain_data.json": pretrain_records, "sft_data.json": sft_records, "eval_data.json": eval_records}

    jobs = []
    if format == "json":
        for json_name, folder, _ in SPLITS:
            (out / folder).mkdir()
            jobs += [(str(out / folder / stored_image_name(folder, name)), scene, cfg.image_size,
                      cfg.png_compress_level)
                     for r in by_split[json_name] for name, scene in zip(record_images(r), record_scenes(r))]
    (out / "eval_images").mkdir()
    jobs += [(str(out / "eval_images" / d["file"]), d["scene"], cfg.image_size, cfg.png_compress_level) for d in demos]
    n_pictures = len(jobs) + (0 if format == "json" else sum(
        len(record_scenes(r)) for records in by_split.values() for r in records))

    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=n_pictures, desc="shapes world: rendering", unit="img", disable=not progress)
    serial = workers == 1 or n_pictures < 256
    with (contextlib.nullcontext() if serial else multiprocessing.get_context().Pool(workers)) as pool:
        if serial:
            for job in jobs:
                _render_job(job)
                bar.update()
        else:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=64):
                bar.update()
        if format == "parquet":
            for json_name, _, parquet_name in SPLITS:
                _write_parquet_split(out / parquet_name, by_split[json_name], cfg, pool, bar)
    bar.close()

    if format == "json":
        _write_json_atomic(out / "pretrain_data.json", pretrain_records)
        _write_json_atomic(out / "sft_data.json", sft_records)
        _write_json_atomic(out / "eval_data.json", eval_records)
    settings = asdict(cfg)
    settings.pop("workers")  # how fast it was made is not part of what was made
    world = {
        "version": SHAPES_WORLD_VERSION,
        "config": settings,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "answer_types": list(cfg.question_types),
        "colour_rgb": {k: list(v) for k, v in COLOUR_RGB.items()},
        "background_rgb": list(BACKGROUND_RGB),
        "size_pixels_at_224": SIZE_PIXELS,
        "eval_images": demos,
    }
    if format != "json":  # (the JSON layout's world.json stays as it always was)
        world["format"] = format
    _write_json_atomic(out / "world.json", world)  # written last: its presence means the world is complete

    eval_counts = {k: sum(r["answer_type"] == k for r in eval_records) for k in cfg.question_types}
    return {
        "out_dir": str(out),
        "seed": cfg.seed,
        "n_pretrain": len(pretrain_records),
        "n_sft": len(sft_records),
        "n_sft_turns": sum(len(r["answer_types"]) for r in sft_records),
        "n_eval": len(eval_records),
        "n_eval_images": len(demos),
        "eval_answer_types": eval_counts,
        "n_images": n_pictures,
        "format": format,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    defaults = ShapesWorldConfig()
    p = argparse.ArgumentParser(prog="python -m minimind_v.data.shapes",
                                description="Generate a synthetic shapes-world dataset in the MiniMind-V layout.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--n-pretrain", type=int, default=defaults.n_pretrain)
    p.add_argument("--n-sft", type=int, default=defaults.n_sft)
    p.add_argument("--n-eval", type=int, default=defaults.n_eval)
    p.add_argument("--n-eval-images", type=int, default=defaults.n_eval_images)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--workers", type=int, default=defaults.workers, help="render processes (0 = one per core)")
    p.add_argument("--format", choices=FORMATS, default="json",
                   help="json: the v1 layout (JSON records + image folders); parquet: the original's current "
                        "layout (pretrain_i2t.parquet, sft_i2t.parquet, eval_i2t.parquet)")
    p.add_argument("--question-types", default=None,
                   help=f"comma-separated kinds of question (default: {','.join(defaults.question_types)}); "
                        f"any of {', '.join(ANSWER_TYPES + EXTRA_ANSWER_TYPES + (TWO_PICTURES,))}")
    p.add_argument("--overwrite", action="store_true", help="replace the shapes-world files in a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = ShapesWorldConfig(seed=args.seed, n_pretrain=args.n_pretrain, n_sft=args.n_sft, n_eval=args.n_eval,
                            n_eval_images=args.n_eval_images, image_size=args.image_size, workers=args.workers)
    if args.question_types:
        cfg.question_types = tuple(k.strip() for k in args.question_types.split(",") if k.strip())
    try:
        s = generate_world(args.out, cfg, progress=not args.no_progress, overwrite=args.overwrite,
                           format=args.format)
    except (FileExistsError, NotADirectoryError, ValueError) as e:
        p.error(str(e))  # a one-line message and exit status 2, not a traceback
    print(f"shapes world (seed {s['seed']}): {s['n_pretrain']} pretrain, {s['n_sft']} sft ({s['n_sft_turns']} turns), "
          f"{s['n_eval']} eval, {s['n_eval_images']} eval images -> {s['out_dir']} in {s['seconds']:.1f} s")
    return s


if __name__ == "__main__":
    main()
