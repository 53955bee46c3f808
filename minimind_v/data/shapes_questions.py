"""What the shapes world says about a scene: captions, and every kind of question with its answer
(attributes, counts, existence, absent objects, grid relations, two pictures)."""

from __future__ import annotations

import random

from .shapes_scenes import (ANSWER_TYPES, COLOURS, NUMBER_WORDS, PLURAL_SHAPES, POSITIONS, RELATIONS, SHAPES, SIZES,
                            TWO_PICTURE_ANSWERS, TWO_PICTURES, describe_object, position_phrase)

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




# ----------------------------------------------------------------------------- questions

def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


CAPTION_ORDERS = ("random", "reading")
# How a relation question is answered: "verdict" says the answer alone ("yes", "circle",
# "nothing"); "worked" first says where the objects the question names are, then the verdict
# ("The circle is in the top left, the red cross at the bottom: yes."), so the comparison is made
# between position words the model has just written, not between patches. "ordered" is "worked"
# with the two objects of a yes/no question named in the order the relation reads ("Is the
# circle below the cross?" -> 'The cross is at the top, the circle at the bottom: yes.'): the
# verdict is then whether the first is above (or left of) the second, whichever word was asked.
# "regions" names the rows or columns the relation points to from the anchor, then looks there
# ("What shape is left of the blue square?" -> 'The blue square is in the center; left of it: the
# left column: circle.'; "Is the circle above the red cross?" -> 'The red cross is at the bottom;
# above it: the top and middle rows; the circle is in the top row: yes.'): the relation and the
# anchor's place meet once, in a region the model writes, and what follows is a lookup in that
# region or a match of the subject's row against its words.
RELATION_ANSWERS = ("verdict", "worked", "ordered", "regions")


def caption(scene: list[dict], rng: random.Random, order: str = "random") -> str:
    """One sentence naming every object's size, colour, shape and position, objects in random order.

    Not in reading order: then the decoder learns to describe a picture by scanning the patches
    from top left to bottom right, and never to look an object up by what it is. In random order,
    saying where "a small red circle" is means finding that circle among the patches.
    ``order="reading"`` (the scene's own order, top left to bottom right) is kept for the ablation
    that shows this; it draws the same random numbers, so both orders caption the same pictures."""
    shuffled = rng.sample(scene, len(scene))
    parts = [f"a {describe_object(o)} {position_phrase(o['position'])}"
             for o in (scene if order == "reading" else shuffled)]
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


def questions(scene: list[dict], rng: random.Random, kinds: tuple = ANSWER_TYPES,
              relation_answers: str = "verdict") -> list[tuple[str, str, str]]:
    """One unambiguous (question, answer, answer_type) per kind in ``kinds`` that this scene
    allows, in that order; relation answers in the form ``relation_answers`` (RELATION_ANSWERS).
    "position" can be missing (when no object is unique without it), and
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
            qa = _relation_question(scene, rng, relation_answers)
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


def _relation_question(scene: list[dict], rng: random.Random,
                       answers: str = "verdict") -> tuple[str, str, str] | None:
    """"What shape is left of the blue square?" (a shape, or "nothing") or "Is the circle above the
    cross?" (yes / no). Objects are named by descriptions that fit them alone. ``answers`` is one
    of RELATION_ANSWERS; both draw the same questions (the answer takes nothing from ``rng``)."""
    named = [(o, descriptive) for o in scene for descriptive in [_references(scene, o, "")[0]] if descriptive]
    if not named:
        return None
    relation = rng.choice(RELATIONS)
    if len(named) >= 2 and rng.random() < 0.4:
        (a, ra), (b, rb) = rng.sample(named, 2)
        # The draws in the order they always came: a seed's world stays the world it was.
        template = rng.choice(QUESTION_TEMPLATES["relation_yes_no"])
        subject = rng.choice(ra)
        subject_phrase = _noun_phrase(subject, rng, True)
        anchor = rng.choice(rb)
        question = template.format(ref=subject_phrase, rel=relation, ref2=_noun_phrase(anchor, rng, True))
        verdict = "yes" if related(a, relation, b) else "no"
        return question, relation_reply(answers, relation, (b, anchor), verdict, (a, subject)), "relation"
    order = list(range(len(named)))
    rng.shuffle(order)
    for i in order:
        anchor, refs = named[i]
        found = [o for o in scene if o is not anchor and related(o, relation, anchor)]
        if len(found) <= 1:  # two objects in that direction would make two right answers
            template = rng.choice(QUESTION_TEMPLATES["relation"])
            ref = rng.choice(refs)
            question = template.format(rel=relation, ref=_noun_phrase(ref, rng, True))
            verdict = found[0]["shape"] if found else "nothing"
            return question, relation_reply(answers, relation, (anchor, ref), verdict), "relation"
    return None


def relation_reply(form: str, relation: str, anchor: tuple[dict, dict], verdict: str,
                   subject: tuple[dict, dict] | None = None) -> str:
    """A relation question's answer in ``form`` (one of RELATION_ANSWERS); ``anchor`` and ``subject``
    are (object, the attributes the question names it by), ``verdict`` the answer alone."""
    if form == "verdict":
        return verdict
    if form == "regions":
        return regions_relation_answer(relation, anchor, verdict, subject)
    return worked_relation_answer(relation, anchor, verdict, subject, form == "ordered")


def _named(named: tuple[dict, dict]) -> str:
    constraints = named[1]
    return " ".join(["the", *(constraints[k] for k in ("size", "colour") if k in constraints),
                     constraints.get("shape", "object")])


ROW_NAMES, COLUMN_NAMES = ("top", "middle", "bottom"), ("left", "center", "right")


def region_phrase(relation: str, position: str) -> str:
    """The rows or columns ``relation`` points to from a cell: ("left of", "right") -> 'the left
    and center columns', ("above", "top left") -> 'no row'."""
    row, column = divmod(POSITIONS.index(position), 3)
    vertical = relation in ("above", "below")
    here, names, unit = (row, ROW_NAMES, "row") if vertical else (column, COLUMN_NAMES, "column")
    lines = [i for i in range(3) if (i < here if relation in ("above", "left of") else i > here)]
    if not lines:
        return f"no {unit}"
    return f"the {' and '.join(names[i] for i in lines)} {unit}{'s' if len(lines) > 1 else ''}"


def line_phrase(relation: str, position: str) -> str:
    """The row (above, below) or column (left of, right of) of a cell: 'the top row', 'the right column'."""
    row, column = divmod(POSITIONS.index(position), 3)
    return f"the {ROW_NAMES[row]} row" if relation in ("above", "below") else f"the {COLUMN_NAMES[column]} column"


def regions_relation_answer(relation: str, anchor: tuple[dict, dict], verdict: str,
                            subject: tuple[dict, dict] | None = None) -> str:
    """A relation's verdict after the anchor's place and the region the relation points to from it.
    "What shape is left of the blue square?" -> 'The blue square is in the center; left of it: the left column: circle.'
    "Is the circle above the red cross?" -> 'The red cross is at the bottom; above it: the top and
    middle rows; the circle is in the top row: yes.' (the subject's row, or column, is in the region or not)."""
    where = position_phrase(anchor[0]["position"])
    text = f"{_named(anchor)} is {where}; {relation} it: {region_phrase(relation, anchor[0]['position'])}"
    if subject is not None:
        text += f"; {_named(subject)} is in {line_phrase(relation, subject[0]['position'])}"
    text += f": {verdict}."
    return text[0].upper() + text[1:]


def worked_relation_answer(relation: str, anchor: tuple[dict, dict], verdict: str,
                           subject: tuple[dict, dict] | None = None, ordered: bool = False) -> str:
    """A relation's verdict after where the named objects are; each is (object, the attributes
    the question names it by).
    "Is the circle above the red cross?" -> 'The circle is in the top left, the red cross at the bottom: yes.'
    "What shape is left of the blue square?" -> 'The blue square is in the center; left of it: circle.'
    ``ordered``: a yes/no question asking "below" or "right of" names the anchor first
    ("Is the circle below the red cross?" -> 'The red cross is at the bottom, the circle in the top left: no.')."""
    name = _named

    def at(named: tuple[dict, dict]) -> str:
        return position_phrase(named[0]["position"])

    if subject is not None:
        first, second = (anchor, subject) if ordered and relation in ("below", "right of") else (subject, anchor)
        text = f"{name(first)} is {at(first)}, {name(second)} {at(second)}: {verdict}."
    else:
        text = f"{name(anchor)} is {at(anchor)}; {relation} it: {verdict}."
    return text[0].upper() + text[1:]


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
