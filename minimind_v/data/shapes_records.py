"""The shapes world's settings, and the records of each split: scenes drawn from a seeded
generator, with their captions (pretraining), question/answer turns (SFT) and held-out
questions, and the colour-shape pairs kept out of training."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .shapes_questions import (CAPTION_ORDERS, CAPTION_REQUESTS, QUESTION_TEMPLATES, RELATION_ANSWERS, caption,
                               questions, single_picture_types, two_picture_question)
from .shapes_scenes import (ANSWER_TYPES, COLOURS, EXTRA_ANSWER_TYPES, NUMBER_WORDS, PLURAL_SHAPES, POSITIONS, SHAPES,
                            SINGULAR, TWO_PICTURES, describe_object, random_scene, scene_key)

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
    # The order captions list their objects in: "random" (the recipe's), or "reading" (top left to
    # bottom right, for the ablation that shows why not).
    caption_order: str = "random"
    # How relation questions are answered: "verdict" (the answer alone), "worked" (where the
    # objects are, then the answer), "ordered" (worked, the objects named in the order the
    # relation reads) or "regions" (the anchor's place and the rows or columns the relation points
    # to, then the answer); RELATION_ANSWERS. The same questions either way.
    relation_answers: str = "verdict"

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
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"ShapesWorldConfig.caption_order must be one of {CAPTION_ORDERS}, "
                             f"got {self.caption_order!r}")
        if self.relation_answers not in RELATION_ANSWERS:
            raise ValueError(f"ShapesWorldConfig.relation_answers must be one of {RELATION_ANSWERS}, "
                             f"got {self.relation_answers!r}")
        if not 0 < self.unseen_eval_fraction < 1:
            raise ValueError(f"ShapesWorldConfig.unseen_eval_fraction must be in (0, 1), got {self.unseen_eval_fraction}")


# ----------------------------------------------------------------------------- the records of each split


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


def repeat_by_objects(records: list[dict], repeats: tuple[int, ...], where: str = "records") -> list[dict]:
    """Each record ``repeats[k - 1]`` times, k its number of objects (with two pictures, the fuller
    one's), the copies side by side in the records' order: an epoch then meets crowded pictures,
    where lookup and counting are hard, more often than one-object pictures, without new ones."""
    out = []
    for i, (record, k) in enumerate(zip(records, objects_per_record(records, where, "repeating records"))):
        if not 1 <= k <= len(repeats):
            raise ValueError(f"{where}[{i}] ({record.get('id', '?')}): {k} objects, but the repeats "
                             f"{','.join(map(str, repeats))} stop at {len(repeats)}")
        out += [record] * repeats[k - 1]
    return out


# What a relation's answer says: no object stands there, the relation does not hold, it holds,
# or the object that stands there.
RELATION_TRUTHS = ("nothing", "no", "yes", "an object")


def relation_truth(answer: str) -> str:
    """One of RELATION_TRUTHS for a relation's answer ("Nothing." -> "nothing", "the red circle" ->
    "an object")."""
    word = answer.strip().lower().rstrip(" .!")
    return word if word in RELATION_TRUTHS[:3] else "an object"


def repeat_found_relations(records: list[dict], repeats: int, where: str = "records") -> list[dict]:
    """Each record with a relation turn answered by an object or "yes" ``repeats`` times, the
    others once, the copies side by side in the records' order. Most relations asked about a
    3x3 grid of up to three objects find nothing there, so a model can answer "nothing" or "no"
    to most of them without comparing anything; this meets the relations that hold more often."""
    out = []
    for i, record in enumerate(records):
        kinds = record.get("answer_types") if isinstance(record, dict) else None
        if not isinstance(kinds, list):
            raise ValueError(f"{where}[{i}] ({record.get('id', '?') if isinstance(record, dict) else '?'}): no "
                             "answer_types: repeating relations takes the shapes world's records")
        try:
            answers = [turn["value"] for turn in record["conversations"][1::2]]
            found = any(kind == "relation" and relation_truth(answer) in ("yes", "an object")
                        for kind, answer in zip(kinds, answers))
        except (AttributeError, KeyError, TypeError):
            raise ValueError(f"{where}[{i}] ({record.get('id', '?')}): its conversations are not "
                             "{'from', 'value'} turns of text") from None
        out += [record] * (repeats if found else 1)
    return out


def objects_per_record(records: list[dict], where: str = "records", purpose: str = "this") -> list[int]:
    """Each record's number of objects (with two pictures, the fuller one's), from its scene
    description; a record without one is refused by its place in ``where``."""
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not ("scene" in record or "scenes" in record):
            raise ValueError(f"{where}[{i}]: no scene description ('scene'): {purpose} by their "
                             f"objects needs the shapes world's records")
        out.append(max(len(scene) for scene in record_scenes(record)))
    return out


def count_shared(records: list[dict], seed: int, where: str = "records") -> list[dict]:
    """The records with each count question answered "one" asked again, where the picture allows,
    about a shape or a colour that two or more of its objects share ("How many crosses are there?"
    -> "two", the crosses of different colours), each such shape or colour once in a record: most
    shapes and colours occur once in a picture, so most count questions of the world's data that
    name one answer "one". The answer is counted from the scene; the picture's tag stays where it
    was; other turns and records are left as they are."""
    rng = random.Random(f"count-shared/{seed}")
    objects_per_record(records, where, "asking counts")  # (every record describes its scene)
    out = []
    for i, record in enumerate(records):
        shared = [] if "scenes" in record else [
            (PLURAL_SHAPES[value] if kind == "shape" else f"{value} objects", n)
            for kind in ("shape", "colour")
            for value in sorted({o[kind] for o in record["scene"]})
            if (n := sum(o[kind] == value for o in record["scene"])) >= 2]
        kinds = record.get("answer_types", [])
        if not shared or "count" not in kinds:
            out.append(record)
            continue
        conversations = [dict(turn) for turn in record["conversations"]]
        if len(conversations) != 2 * len(kinds):
            raise ValueError(f"{where}[{i}] ({record.get('id', '?')}): {len(kinds)} answer types for "
                             f"{len(conversations)} turns; a question and its answer per answer type")
        rng.shuffle(shared)
        for t, kind in enumerate(kinds):
            if kind != "count" or conversations[2 * t + 1]["value"] != NUMBER_WORDS[1] or not shared:
                continue
            plural, n = shared.pop()
            question = rng.choice(QUESTION_TEMPLATES["count"]).format(plural=plural)
            asked = conversations[2 * t]["value"]
            conversations[2 * t]["value"] = ("<image>\n" + question if asked.startswith("<image>\n") else
                                             question + "\n<image>" if asked.endswith("\n<image>") else question)
            conversations[2 * t + 1]["value"] = NUMBER_WORDS[n]
        out.append({**record, "conversations": conversations})
    return out


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


def pretrain_records(cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
    rng = random.Random(f"shapes-world/{cfg.seed}/pretrain")
    records = []
    for i in range(cfg.n_pretrain):
        scene = _fresh_scene(rng, cfg, held_out)
        conv = [
            {"from": "human", "value": _human_turn(rng.choice(CAPTION_REQUESTS), rng)},
            {"from": "gpt", "value": caption(scene, rng, cfg.caption_order)},
        ]
        records.append(_record("pretrain", i, scene, conv))
    return records


def sft_records(cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
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
        for qa in questions(scene, rng, cfg.question_types, cfg.relation_answers):
            if not names_held_out_pair(qa[0], cfg):
                pool.setdefault(qa[0], qa)
    return rng.sample(list(pool.values()), min(n, len(pool)))


def eval_records(cfg: ShapesWorldConfig) -> list[dict]:
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
            qa = [x for x in questions(scene, rng, cfg.question_types, cfg.relation_answers) if x[2] == kind]
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


def demo_images(cfg: ShapesWorldConfig, held_out: set) -> list[dict]:
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
