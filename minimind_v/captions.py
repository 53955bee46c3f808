"""How right a caption is: the objects a shapes-world caption names, read back and checked against
the scene, and a model's captions of held-out pictures measured that way (chapter 07 compares the
model after pretraining with the model after SFT)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .data.shapes import COLOURS, POSITIONS, SHAPES, SIZES
from .data.shapes_answers import alternation
from .evaluate import CAPTION_PROMPT


# "a small red circle in the top left", "a large blue cross at the bottom", "... on the right"
_OBJECT = re.compile(rf"\ban? ({alternation(SIZES)}) ({alternation(COLOURS)}) ({alternation(SHAPES)}) "
                     rf"(?:in|at|on) the ({alternation(POSITIONS)})\b", re.IGNORECASE)


def said_objects(text: str) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, position) of every object the caption names, in its order."""
    return [tuple(word.lower() for word in m.groups()) for m in _OBJECT.finditer(text)]


def scene_objects(scene: list[dict]) -> list[tuple[str, str, str, str]]:
    return [(o["size"], o["colour"], o["shape"], o["position"]) for o in scene]


def judge_caption(text: str, scene: list[dict]) -> dict:
    """exact: it names every object of the scene with all four attributes right, and nothing else;
    right / said / there: objects named correctly, objects named, objects in the picture."""
    said, there = Counter(said_objects(text)), Counter(scene_objects(scene))
    return {"exact": said == there, "right": sum((said & there).values()), "said": sum(said.values()),
            "there": sum(there.values())}


def held_out_pictures(world: str | Path, limit: int | None = None) -> list[tuple[Path, list[dict]]]:
    """(picture file, scene) of the distinct one-picture held-out records of a JSON-layout world."""
    from .data.layouts import resolve_data
    from .data.records import find_image

    path, image_dir = resolve_data(world, "eval_data.json", "eval_data_images")
    if image_dir is None:
        raise ValueError(f"{world}: caption accuracy reads the JSON layout (eval_data.json + eval_data_images/)")
    pictures, seen = [], set()
    for record in json.loads(path.read_text(encoding="utf-8")):
        name = record.get("image")
        if not isinstance(name, str) or name in seen or "scene" not in record:
            continue  # two-picture records have a list of names
        seen.add(name)
        pictures.append((find_image(image_dir, name, str(path), record.get("id")), record["scene"]))
        if limit is not None and len(pictures) == limit:
            break
    return pictures


def caption_accuracy(vlm, world: str | Path, limit: int | None = 200, batch_size: int = 32,
                     max_new_tokens: int = 64) -> dict:
    """Caption each held-out picture greedily and judge it: the share of exact captions, and of the
    objects there that were named right (recall) and of the objects named that are there
    (precision); ``rows`` holds every caption with its verdict."""
    from .inference import answer

    pictures = held_out_pictures(world, limit)
    rows = []
    for lo in range(0, len(pictures), batch_size):
        chunk = pictures[lo:lo + batch_size]
        captions = answer(vlm, [str(p) for p, _ in chunk], [CAPTION_PROMPT] * len(chunk),
                          max_new_tokens=max_new_tokens)
        rows += [{"image": p.name, "caption": c, **judge_caption(c, scene)} for (p, scene), c in zip(chunk, captions)]
    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    return {"pictures": len(rows), "exact": total("exact") / max(len(rows), 1),
            "recall": total("right") / max(total("there"), 1), "precision": total("right") / max(total("said"), 1),
            "rows": rows}
