"""The shapes world: every answer is checked against the scene and, independently, against the pixels."""

import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimind_v.data import shapes
from minimind_v.data.shapes import (
    ANSWER_TYPES, BACKGROUND_RGB, COLOUR_RGB, COLOURS, POSITIONS, SHAPES, SIZES,
    ShapesWorldConfig, answer, caption, generate_world, questions, random_scene, render_scene, stored_image_name,
)

PATCH = 32  # CLIP ViT-B/32
RGB_TO_COLOUR = {rgb: name for name, rgb in COLOUR_RGB.items()}
SMALL_WORLD = dict(n_pretrain=40, n_sft=60, n_eval=50, n_eval_images=4, workers=1)


# ----------------------------------------------------------------------------- independent readers


def cell_bounds(index, image_size):
    """Pixel slice bounds of grid cell `index` (row-major), from the 3x3 split alone."""
    row, col = divmod(index, 3)
    edges = [round(i * image_size / 3) for i in range(4)]
    return edges[row], edges[row + 1], edges[col], edges[col + 1]


def classify_shape(mask):
    """Name a filled shape from its mask cropped to its bounding box, by how it fills the box."""
    fill = mask.mean()
    bottom_row, top_row, middle_row = mask[-1].mean(), mask[0].mean(), mask[mask.shape[0] // 2].mean()
    corners = [mask[0, 0], mask[0, -1], mask[-1, 0], mask[-1, -1]]
    if fill > 0.97:
        return "square"
    if bottom_row > 0.95 and top_row < 0.2 and 0.4 < fill < 0.6:
        return "triangle"
    if not any(corners) and 0.7 < fill < 0.86:
        return "circle"
    if not any(corners) and middle_row > 0.95 and 0.25 < top_row < 0.45 and 0.5 < fill < 0.62:
        return "cross"
    return None


def read_objects(image):
    """Objects seen in the pixels: one per grid cell that holds non-background pixels."""
    pixels = np.asarray(image.convert("RGB"))
    size = pixels.shape[0]
    foreground = np.any(pixels != np.array(BACKGROUND_RGB, dtype=np.uint8), axis=-1)
    objects = []
    for index, position in enumerate(POSITIONS):
        y0, y1, x0, x1 = cell_bounds(index, size)
        cell = foreground[y0:y1, x0:x1]
        if not cell.any():
            continue
        ys, xs = np.nonzero(cell)
        # Nothing touches the cell border: objects never spill into a neighbouring cell.
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < cell.shape[0] - 1 and xs.max() < cell.shape[1] - 1
        crop = cell[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        colours = {tuple(c) for c in pixels[y0:y1, x0:x1][cell]}
        assert len(colours) == 1, f"object in the {position} has several colours {colours}"
        cy, cx = y0 + (ys.min() + ys.max()) // 2, x0 + (xs.min() + xs.max()) // 2
        centre = tuple(int(v) for v in pixels[cy, cx])
        width = xs.max() - xs.min() + 1
        objects.append({
            "shape": classify_shape(crop),
            "colour": RGB_TO_COLOUR.get(centre),
            "size": "small" if width * 224 / size < 53 else "large",
            "position": position,
            "width": int(width), "height": int(ys.max() - ys.min() + 1),
            "columns": (x0 + xs.min()) // PATCH, "columns_end": (x0 + xs.max()) // PATCH,
            "rows": (y0 + ys.min()) // PATCH, "rows_end": (y0 + ys.max()) // PATCH,
        })
    return objects


_POSITION_RE = re.compile(r"\b(?:in|at|on) the (top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b")
_PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
_NUMBERS = ["zero", "one", "two", "three"]


def resolve(objects, question, answer_type):
    """Answer a question from a list of objects by spotting attribute words, not by the module's parser."""
    text = question.replace("<image>", " ").lower()
    text = text.replace("small or large", "").replace("large or small", "")
    constraints = {}
    m = _POSITION_RE.search(text)
    if m:
        constraints["position"] = m.group(1)
        text = text[:m.start()] + text[m.end():]
    for word in re.findall(r"[a-z]+", text):
        if word in SIZES:
            constraints["size"] = word
        elif word in COLOURS:
            constraints["colour"] = word
        elif word in SHAPES:
            constraints["shape"] = word
        elif word in _PLURALS:
            constraints["shape"] = _PLURALS[word]
    found = [o for o in objects if all(o[k] == v for k, v in constraints.items())]
    if answer_type == "count":
        return _NUMBERS[len(found)]
    assert answer_type not in constraints, f"{question!r} names the attribute it asks for"
    assert len(found) == 1, f"{question!r} is ambiguous: it fits {len(found)} objects of {objects}"
    return found[0][answer_type]


def qa_turns(record):
    conv = record["conversations"]
    kinds = record.get("answer_types") or [record["answer_type"]]
    assert len(conv) == 2 * len(kinds)
    return [(conv[2 * i]["value"], conv[2 * i + 1]["value"], k) for i, k in enumerate(kinds)]


def pixel_hash(path):
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def load(out, name):
    return json.loads((out / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "shapes"
    summary = generate_world(out, ShapesWorldConfig(seed=3, **SMALL_WORLD), progress=False)
    return out, summary


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_every_object_spans_several_patches_and_stays_in_its_cell(shape, size):
    m = shapes.max_offset(size)
    assert m >= 0
    for position in POSITIONS:
        for offset in ([-m, -m], [m, m], [-m, m], [0, 0]):
            scene = [{"shape": shape, "colour": "red", "size": size, "position": position, "offset": offset}]
            (seen,) = read_objects(render_scene(scene))  # also asserts it stays inside its cell
            assert (seen["shape"], seen["colour"], seen["size"], seen["position"]) == (shape, "red", size, position)
            # Wider and taller than a patch, so its outline is spread over several patch tokens.
            assert seen["width"] > PATCH and seen["height"] > PATCH
            assert seen["columns_end"] > seen["columns"] and seen["rows_end"] > seen["rows"]


def test_sizes_are_clearly_different():
    widths = {s: read_objects(render_scene([{"shape": "square", "colour": "blue", "size": s, "position": "center"}]))[0]["width"]
              for s in SIZES}
    assert widths["large"] >= 1.4 * widths["small"]


@pytest.mark.parametrize("image_size", [128, 224, 300])
def test_other_image_sizes_keep_objects_readable(image_size):
    rng = random.Random(7)
    for _ in range(30):
        scene = random_scene(rng)
        seen = read_objects(render_scene(scene, image_size))
        assert [(o["shape"], o["colour"], o["size"], o["position"]) for o in seen] == \
               [(o["shape"], o["colour"], o["size"], o["position"]) for o in scene]


# ----------------------------------------------------------------------------- language


def test_questions_are_unambiguous_and_answers_rederive():
    rng = random.Random(11)
    seen_types, count_answers = set(), set()
    for _ in range(2000):
        scene = random_scene(rng)
        qas = questions(scene, rng)
        assert len({q for q, _, _ in qas}) == len(qas)
        for q, a, kind in qas:
            assert kind in ANSWER_TYPES
            assert answer(scene, q) == a
            assert resolve(scene, q, kind) == a
            assert a == a.lower() and not a.endswith(".")
            seen_types.add(kind)
            if kind == "count":
                count_answers.add(a)
                assert a in ("one", "two", "three")  # counts of attributes present, 1..3
    assert seen_types == set(ANSWER_TYPES)
    assert count_answers == {"one", "two", "three"}


def test_answer_rejects_unknown_and_ambiguous_questions():
    scene = [{"shape": "circle", "colour": "red", "size": "small", "position": "top"},
             {"shape": "circle", "colour": "blue", "size": "large", "position": "left"}]
    with pytest.raises(ValueError, match="not a shapes-world question"):
        answer(scene, "What is the meaning of life?")
    with pytest.raises(ValueError, match="refers to 2 objects"):
        answer(scene, "What colour is the circle?")
    with pytest.raises(ValueError, match="refers to 0 objects"):
        answer(scene, "What colour is the square?")
    assert answer(scene, "<image>\nWhat colour is the large circle?") == "blue"
    assert answer(scene, "What is at the top?") == "circle"
    assert answer(scene, "Where is the blue object?") == "left"
    assert answer(scene, "How many circles are there?\n<image>") == "two"
    assert answer(scene, "Is the red circle small or large?") == "small"


def test_captions_name_every_object_and_nothing_else():
    rng = random.Random(5)
    object_re = re.compile(r"\ba (small|large) (\w+) (\w+) (?:in|at|on) the (top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b")
    texts, orders = set(), set()
    for _ in range(500):
        scene = random_scene(rng)
        text = caption(scene, rng)
        texts.add(re.sub(object_re, "X", text))
        mentioned = [m.groups() for m in object_re.finditer(text.lower())]
        objects = [(o["size"], o["colour"], o["shape"], o["position"]) for o in scene]
        assert sorted(mentioned) == sorted(objects), text  # every object once, nothing else
        orders.add(tuple(objects.index(m) for m in mentioned))
        assert text[0].isupper() and text.endswith(".")
    assert len({t.split("X")[0] for t in texts}) >= 3  # several sentence templates in use
    # Objects in random order, not the scene's reading order: all six orders of three objects.
    assert {o for o in orders if len(o) == 3} == set(itertools.permutations(range(3)))


# ----------------------------------------------------------------------------- the written world


def test_layout_matches_the_original_dataset(world):
    out, summary = world
    for json_name, folder, n in (("pretrain_data.json", "pretrain_images", 40), ("sft_data.json", "sft_images", 60),
                                 ("eval_data.json", "eval_data_images", 50)):
        records = load(out, json_name)
        assert len(records) == n
        # v1's SFT loader opens sft_images/COCO_train2014_<image>; its pretraining loader the plain name.
        prefix = "COCO_train2014_" if folder == "sft_images" else ""
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(prefix + r["image"] for r in records)
        assert len({r["id"] for r in records}) == n
        for r in records:
            assert list(r)[:4] == ["id", "image", "conversations", "scene"]
            conv = r["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            humans = [t["value"] for t in conv if t["from"] == "human"]
            assert humans[0].count("<image>") == 1 and all("<image>" not in h for h in humans[1:])
            assert humans[0].startswith("<image>\n") or humans[0].endswith("\n<image>")
    sft = load(out, "sft_data.json")
    cfg = ShapesWorldConfig()
    assert {len(r["conversations"]) // 2 for r in sft} == set(range(cfg.min_sft_turns, cfg.max_sft_turns + 1))
    for r in sft:  # a record never asks the same question twice
        asked = [t["value"].replace("<image>", "").strip() for t in r["conversations"][::2]]
        assert len(set(asked)) == len(asked), r["id"]
    # Longer records ask some answer type twice (about another object, or in other words).
    assert any(len(set(r["answer_types"])) < len(r["answer_types"]) for r in sft)
    world_json = load(out, "world.json")
    assert world_json["config"]["seed"] == 3 and world_json["config"]["n_sft"] == 60
    assert world_json["shapes"] == list(SHAPES) and world_json["positions"] == list(POSITIONS)
    demo_files = sorted(p.name for p in (out / "eval_images").iterdir())
    assert demo_files == sorted(d["file"] for d in world_json["eval_images"]) and len(demo_files) == 4
    for d in world_json["eval_images"]:  # the name says what is in the picture
        assert d["file"] == "_and_".join(f"{o['size']}_{o['colour']}_{o['shape']}" for o in d["scene"]) + ".png"
    assert summary["n_sft_turns"] == sum(len(r["conversations"]) // 2 for r in sft)


def test_pictures_match_scenes_and_every_answer_checks_out(world):
    out, _ = world
    for json_name, folder in (("pretrain_data.json", "pretrain_images"), ("sft_data.json", "sft_images"),
                              ("eval_data.json", "eval_data_images")):
        for r in load(out, json_name):
            seen = read_objects(Image.open(out / folder / stored_image_name(folder, r["image"])))
            assert [{k: o[k] for k in ("shape", "colour", "size", "position")} for o in seen] == \
                   [{k: o[k] for k in ("shape", "colour", "size", "position")} for o in r["scene"]], r["id"]
            if json_name == "pretrain_data.json":
                continue
            for q, a, kind in qa_turns(r):
                assert answer(r["scene"], q) == a, (r["id"], q)
                assert resolve(seen, q, kind) == a, (r["id"], q)  # from the pixels alone


def test_eval_has_one_question_each_and_every_answer_type(world):
    out, summary = world
    records = load(out, "eval_data.json")
    assert all(len(r["conversations"]) == 2 for r in records)
    counts = {k: sum(r["answer_type"] == k for r in records) for k in ANSWER_TYPES}
    assert counts == {k: 10 for k in ANSWER_TYPES} == summary["eval_answer_types"]


def test_same_seed_is_byte_identical_and_other_seeds_differ(tmp_path):
    cfg = dict(n_pretrain=20, n_sft=20, n_eval=10, n_eval_images=2, workers=1)
    generate_world(tmp_path / "a", ShapesWorldConfig(seed=1, **cfg), progress=False)
    random.seed(12345)  # the global generator must play no part
    np.random.seed(12345)
    generate_world(tmp_path / "b", ShapesWorldConfig(seed=1, **cfg), progress=False)
    generate_world(tmp_path / "c", ShapesWorldConfig(seed=2, **cfg), progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for name in ("pretrain_data.json", "sft_data.json", "eval_data.json"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_cli_in_a_fresh_process_and_parallel_rendering_give_the_same_bytes(tmp_path):
    # Over 256 pictures, so the process pool renders them; a different hash seed must not matter.
    args = ["--seed", "4", "--n-pretrain", "150", "--n-sft", "100", "--n-eval", "20", "--n-eval-images", "3"]
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    done = subprocess.run([sys.executable, "-m", "minimind_v.data.shapes", "--out", str(tmp_path / "cli"),
                           "--workers", "2", "--no-progress", *args],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert re.search(r"150 pretrain, 100 sft \(\d+ turns\), 20 eval, 3 eval images .* in [\d.]+ s", done.stdout)
    generate_world(tmp_path / "serial", ShapesWorldConfig(seed=4, n_pretrain=150, n_sft=100, n_eval=20,
                                                          n_eval_images=3, workers=1), progress=False)
    for f in (tmp_path / "serial").rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "cli" / f.relative_to(tmp_path / "serial")).read_bytes(), f


def test_held_out_pictures_never_appear_in_training(world):
    out, _ = world
    held_out = {p.name: pixel_hash(p) for d in ("eval_data_images", "eval_images") for p in (out / d).iterdir()}
    training = {p.name: pixel_hash(p) for d in ("pretrain_images", "sft_images") for p in (out / d).iterdir()}
    assert not set(held_out) & set(training)
    assert not set(held_out.values()) & set(training.values())


def test_held_out_pictures_are_excluded_even_when_collisions_are_likely(tmp_path, monkeypatch):
    # No jitter and one object: only 360 different pictures, so 150 held-out and 300 training
    # pictures would certainly collide if training scenes were not filtered.
    monkeypatch.setattr(shapes, "max_offset", lambda size: 0)
    cfg = ShapesWorldConfig(seed=0, n_pretrain=150, n_sft=150, n_eval=150, n_eval_images=4,
                            min_objects=1, max_objects=1, workers=1)
    generate_world(tmp_path / "w", cfg, progress=False)
    out = tmp_path / "w"
    held_out = {pixel_hash(p) for d in ("eval_data_images", "eval_images") for p in (out / d).iterdir()}
    training = [pixel_hash(p) for d in ("pretrain_images", "sft_images") for p in (out / d).iterdir()]
    assert len(held_out) > 50 and len(set(training)) < len(training)  # collisions were really possible
    assert not held_out & set(training)


def test_refuses_to_overwrite_and_replaces_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = ShapesWorldConfig(seed=0, n_pretrain=5, n_sft=5, n_eval=5, n_eval_images=1, workers=1)
    with pytest.raises(FileExistsError, match="not empty"):
        generate_world(out, cfg, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit):  # the CLI refuses as well, with the reason
        shapes.main(["--out", str(out), "--n-pretrain", "5", "--no-progress"])
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    generate_world(out, cfg, progress=False, overwrite=True)
    stale = out / "pretrain_images" / "stale.png"
    stale.write_bytes(b"old")
    generate_world(out, cfg, progress=False, overwrite=True)
    assert not stale.exists() and (out / "notes.txt").read_text() == "keep me"
    assert len(load(out, "pretrain_data.json")) == 5


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="n_sft"):
        ShapesWorldConfig(n_sft=-1).validate()
    with pytest.raises(ValueError, match="max_objects"):
        ShapesWorldConfig(min_objects=3, max_objects=2).validate()
    with pytest.raises(ValueError, match="max_sft_turns"):
        ShapesWorldConfig(min_sft_turns=5, max_sft_turns=4).validate()
    with pytest.raises(ValueError, match=r"scene\[0\]\.colour"):
        shapes.validate_scene([{"shape": "circle", "colour": "pink", "size": "small", "position": "top"}])


def test_scene_key_is_equal_exactly_when_the_pictures_are():
    # A large object near the bottom edge: the cell margin clamps offsets 1 and 2 to the same box.
    a = [{"shape": "triangle", "colour": "blue", "size": "large", "position": "bottom", "offset": [0, 1]}]
    b = [dict(a[0], offset=[0, 2])]
    c = [dict(a[0], offset=[1, 1])]
    same = np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(b)))
    assert same and shapes.scene_key(a) == shapes.scene_key(b)
    assert not np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(c)))
    assert shapes.scene_key(a) != shapes.scene_key(c)
    rng = random.Random(0)
    for _ in range(300):
        s, t = random_scene(rng), random_scene(rng)
        pictures_equal = np.array_equal(np.asarray(render_scene(s)), np.asarray(render_scene(t)))
        assert pictures_equal == (shapes.scene_key(s) == shapes.scene_key(t))


def test_reading_order_captions_the_same_pictures_top_left_first():
    """The ablation's world: the same scenes and caption templates as the recipe's, the objects
    listed in grid order instead of a random one."""
    from minimind_v.data.shapes import pretrain_records

    base = ShapesWorldConfig(**SMALL_WORLD)
    reading = ShapesWorldConfig(**SMALL_WORLD, caption_order="reading")
    shuffled_somewhere = False
    for a, b in zip(pretrain_records(base, set()), pretrain_records(reading, set()), strict=True):
        assert a["scene"] == b["scene"] and a["image"] == b["image"]
        said_random, said_reading = a["conversations"][1]["value"], b["conversations"][1]["value"]
        # Where each object is first named, read off the caption text.
        at = lambda text, o: text.index(f"{o['size']} {o['colour']} {o['shape']}")  # noqa: E731
        grid = sorted(a["scene"], key=lambda o: POSITIONS.index(o["position"]))
        assert sorted(grid, key=lambda o: at(said_reading, o)) == grid
        words = lambda text: sorted(re.findall(r"\w+", text.lower()))  # noqa: E731
        assert words(said_random) == words(said_reading)  # the same words, reordered
        shuffled_somewhere |= sorted(grid, key=lambda o: at(said_random, o)) != grid
    assert shuffled_somewhere
    with pytest.raises(ValueError, match="caption_order"):
        ShapesWorldConfig(caption_order="alphabetical").validate()
