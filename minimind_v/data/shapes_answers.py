"""Reading a shapes-world question back: its form, its constraints, and the answer re-derived from
the scene alone, so every answer in the data (and every model answer) can be checked."""

from __future__ import annotations

import re

from .shapes_questions import (QUESTION_TEMPLATES, RELATION_ANSWERS, TWO_PICTURE_TEMPLATES, _count_in, _matches,
                               absent_answer, related, relation_reply)
from .shapes_scenes import COLOURS, NUMBER_WORDS, PLURAL_SHAPES, POSITIONS, RELATIONS, SHAPES, SINGULAR, SIZES

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



def alternation(words) -> str:
    """Regex alternation, longest first, so 'top left' wins over 'top'."""
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))

def _pos_re(prefix: str = "") -> str:
    return rf"(?:in|at|on) the (?P<{prefix}position>{alternation(POSITIONS)})"


def _ref_re(prefix: str = "") -> str:
    """'the large red circle in the top left': a definite reference to one object."""
    return (rf"the (?:(?P<{prefix}size>{alternation(SIZES)}) )?(?:(?P<{prefix}colour>{alternation(COLOURS)}) )?"
            rf"(?P<{prefix}noun>{alternation(SHAPES + ('object', 'shape'))})(?: {_pos_re(prefix)})?")


_POS_RE = _pos_re()
_REF_RE = _ref_re()
_PLURAL_RE = (
    rf"(?:(?P<attr>{alternation(SIZES + COLOURS)}) )?(?P<noun>{alternation(tuple(PLURAL_SHAPES.values()) + ('objects',))})"
)
_DESC_RE = (  # 'a large red circle', 'a red object': what an existence question asks about
    rf"a (?:(?P<size>{alternation(SIZES)}) )?(?:(?P<colour>{alternation(COLOURS)}) )?(?P<noun>{alternation(SHAPES + ('object',))})"
)
_REL_RE = rf"(?P<relation>{alternation(RELATIONS)})"


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


def answer(scene: list[dict], question: str, absent_ok: bool = False, relation_answers: str = "verdict") -> str:
    """Re-derive the answer to a generated question from the scene alone.

    A question about an object that is not there raises ValueError, unless ``absent_ok`` (the
    worlds that ask such questions on purpose), where it gets ``absent_answer``. Unknown questions
    and references that fit several objects always raise. Relation answers come in the form
    ``relation_answers`` (the world's setting of that name)."""
    if relation_answers not in RELATION_ANSWERS:
        raise ValueError(f"answer: relation_answers must be one of {RELATION_ANSWERS}, got {relation_answers!r}")
    kind, constraints = parse_question(question)
    if kind == "existence":
        return "yes" if any(_matches(o, constraints) for o in scene) else "no"
    if kind == "relation":
        relation = constraints["relation"]
        anchor = _the_one(scene, constraints["anchor"], question)
        if "subject" in constraints:
            subject = _the_one(scene, constraints["subject"], question)
            verdict = "yes" if related(subject, relation, anchor) else "no"
            return relation_reply(relation_answers, relation, (anchor, constraints["anchor"]), verdict,
                                  (subject, constraints["subject"]))
        found = [o for o in scene if o is not anchor and related(o, relation, anchor)]
        if len(found) > 1:
            raise ValueError(f"answer: {question!r} has {len(found)} answers in the scene {scene!r}")
        verdict = found[0]["shape"] if found else "nothing"
        return relation_reply(relation_answers, relation, (anchor, constraints["anchor"]), verdict)
    found = [o for o in scene if _matches(o, constraints)]
    if kind == "count":
        return NUMBER_WORDS[len(found)]
    if not found and absent_ok:
        return absent_answer(constraints)
    return _the_one(scene, constraints, question)[kind]
