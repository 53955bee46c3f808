"""One check for a conversation record, shared by training (both layouts) and evaluation.

A record is ``{"id", "image", "conversations": [{"from": "human", "value": "...<image>..."},
{"from": "gpt", "value": "..."}, ...]}`` (the original v1 JSON layout) or, as in the original's
parquet files, a list of ``{"role": "system"|"user"|"assistant", "content": ...}`` turns; a
system turn may come first. ``image`` may name several pictures (a list), one ``<image>`` tag
each, in order. Every way a record can be wrong raises a :class:`DataError` that names the
record (its id, or ``#index`` without one) and the file, and carries a short ``kind`` so that a
run that skips bad records can say how many it dropped for each reason.

The image name a record gives is a name *inside* the dataset's image folder: an absolute path,
a ``..`` or a link that leads out of the folder is refused before anything is opened. A picture
is found under the record's name, or under the original SFT naming
(``COCO_train2014_`` + the name: v1's SFT loader opens ``sft_images/COCO_train2014_<image>``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from ..runfiles import inside
from ..tokenizer import IMAGE_TAG, SEED_ROLES

# The reasons a record or its picture is refused (DataError.kind, Skipped.kind).
NOT_AN_OBJECT = "not an object"
NO_IMAGE_NAME = "no image name"
IMAGE_OUTSIDE = "image path outside the folder"
NO_CONVERSATION = "no question and answer"
BAD_TURN = "malformed turn"
TURN_ORDER = "turns out of order"
IMAGE_TAGS = "wrong <image> tags"
EMPTY_ANSWER = "empty answer"
UNENCODABLE = "cannot be encoded"
TOO_LONG = "too long"
NO_TARGETS = "no answer tokens"
UNREADABLE_IMAGE = "unreadable image"
NOT_CACHED = "image not in the feature cache"
BAD_CONVERSATIONS = "malformed conversations"  # a parquet row whose conversations are not a JSON list

# v1's SFT loader reads sft_images/COCO_train2014_<record's image>; its pretraining loader the plain name.
ORIGINAL_SFT_PREFIX = "COCO_train2014_"


class DataError(ValueError):
    """A record that cannot be used; the message names the record and the file.

    ``kind`` is one of the reasons above; ``record`` the record's id (or ``#index``).
    """

    def __init__(self, message: str, kind: str = "bad record", record: str | None = None):
        super().__init__(message)
        self.kind, self.record = kind, record

    def __reduce__(self):  # keep kind and record when raised in a DataLoader worker
        return type(self), (str(self), self.kind, self.record)


@dataclass(frozen=True)
class Skipped:
    """A record left out of a run: its id, the kind of problem and the full message."""

    id: str
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_error(cls, error: DataError, rid: str | None = None) -> "Skipped":
        return cls(str(rid if rid is not None else error.record), getattr(error, "kind", "bad record"), str(error))


class CheckedRecord(NamedTuple):
    id: str  # the record's id, or "#index"
    image: str | list | None  # the image name(s) as the record gives them (None when no image is needed)
    image_path: Path | None  # image_dir / (first) image, confined to image_dir (None without image_dir)
    turns: list  # the conversation turns, as in the record
    images: tuple = ()  # every picture's name, in the order of their <image> tags
    messages: list | None = None  # the turns as chat messages [{"role", "content"}], system turns included


def read_records(json_path: str | Path) -> list:
    """The JSON list of records, with a clear error for a missing or malformed file."""
    json_path = Path(json_path)
    if not json_path.exists():
        raise FileNotFoundError(f"dataset file {json_path} does not exist")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{json_path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def record_id(record, index: int) -> str:
    """How messages name a record: its id, or "#index" when it has none."""
    rid = record.get("id") if isinstance(record, dict) else None
    return f"#{index}" if rid is None or isinstance(rid, (dict, list)) else str(rid)


def check_record(
    record,
    index: int,
    json_path,
    need_image: bool = True,
    image_dir: str | Path | None = None,
    image_tags: str = "one",
) -> CheckedRecord:
    """Check one record; return its parts, or raise DataError naming it, the file and the problem.

    need_image: the record must name its image file(s) (``image``: a name, or a list of names),
    inside ``image_dir`` when that is given (never opened here). image_tags: "one" (training:
    exactly one <image> per picture, in user turns), "at_most_one" (evaluation: the question
    may leave the tags out, they are put in front), or "any" (text-only training drops the tags).
    """
    rid = record_id(record, index)
    where = f"record {rid!r} in {json_path}"

    def fail(problem: str, kind: str):
        raise DataError(f"{where}{problem}", kind, rid)

    if not isinstance(record, dict):
        fail(f" is a {type(record).__name__}, not an object", NOT_AN_OBJECT)
    image = record.get("image")
    names: tuple = ()
    image_path = None
    if need_image:
        names = tuple(image) if isinstance(image, list) else (image,)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            fail(" has no 'image' file name", NO_IMAGE_NAME)
        paths = [confined_image_path(image_dir, name, where, rid) for name in names]
        image_path = paths[0]
    messages = check_turns(record.get("conversations"), where, rid,
                           n_images=len(names) if need_image else 0,
                           image_tags=image_tags if need_image else "any")
    return CheckedRecord(rid, image if need_image else None, image_path, record.get("conversations"),
                         names, messages)


def check_turns(turns, where: str, rid=None, n_images: int = 1, image_tags: str = "one") -> list[dict]:
    """Check a conversation and return it as chat messages ``[{"role", "content"}]``.

    Turns are ``{"from": "human"|"gpt"|"system", "value"}`` or ``{"role": "user"|"assistant"|
    "system", "content"}``: system turns first (optional), then user, assistant, user, ... with
    at least one question and one answer. ``n_images`` pictures go with it; image_tags: "one"
    (exactly one <image> per picture, in user turns), "at_most_one" (the tags are all in the first
    question, or left out), "any" (not checked: text-only training drops them).
    Raises DataError (``where`` + the problem, with its ``kind``).
    """

    def fail(problem: str, kind: str):
        raise DataError(f"{where}{problem}", kind, rid)

    if not isinstance(turns, list) or len(turns) < 2:
        fail(" needs a 'conversations' list with a question and an answer", NO_CONVERSATION)
    seed_format = not any(isinstance(t, dict) and "role" in t for t in turns)
    field = "value" if seed_format else "content"
    if not all(isinstance(t, dict) and isinstance(t.get("value" if "role" not in t else "content"), str)
               for t in turns):
        fail(f": every turn needs a string {field!r}", BAD_TURN)
    messages = []
    for i, turn in enumerate(turns):
        if "role" in turn:
            messages.append({"role": turn["role"], "content": turn["content"]})
        else:
            speaker = turn.get("from")
            role = (SEED_ROLES.get(speaker, "system" if speaker == "system" else None)
                    if isinstance(speaker, str) else None)
            messages.append({"role": role if role is not None else speaker, "content": turn["value"]})
    n_system = 0
    while n_system < len(messages) and messages[n_system]["role"] == "system":
        n_system += 1
    for i in range(n_system, len(messages)):
        expected = "user" if (i - n_system) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            if seed_format:
                said = {"user": "human", "assistant": "gpt"}[expected]
                fail(f": turn {i} is from {turns[i].get('from')!r}, expected {said!r} "
                     f"(turns alternate human, gpt, ...)", TURN_ORDER)
            fail(f": turn {i} has role {messages[i]['role']!r}, expected {expected!r} "
                 f"(a system turn first, then turns alternate user, assistant, ...)", TURN_ORDER)
    if len(messages) - n_system < 2:
        fail(" needs a 'conversations' list with a question and an answer", NO_CONVERSATION)
    # An empty answer would teach the model to stop at once; a silent default is wrong.
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            fail(f": turn {i} (an answer) is empty", EMPTY_ANSWER)
    if image_tags == "any":
        return messages
    counts = [m["content"].count(IMAGE_TAG) for m in messages]
    total = sum(counts)
    for i, (m, count) in enumerate(zip(messages, counts)):
        if count and m["role"] != "user":
            what = "an answer" if m["role"] == "assistant" else "a system turn"
            fail(f": the {IMAGE_TAG!r} tag is in turn {i}, {what}; it belongs in a human turn", IMAGE_TAGS)
    if image_tags == "one":
        if n_images and total == 0:
            fail(f": no turn holds the {IMAGE_TAG} tag (where does the picture go?)", IMAGE_TAGS)
        if total != n_images:
            expected = "exactly 1" if n_images == 1 else f"{n_images}, one per picture"
            fail(f": {total} {IMAGE_TAG!r} tags, expected {expected}", IMAGE_TAGS)
    elif image_tags == "at_most_one":
        if total not in (0, n_images):
            expected = "exactly 1" if n_images == 1 else f"{n_images}, one per picture"
            fail(f": {total} {IMAGE_TAG!r} tags, expected {expected}", IMAGE_TAGS)
        first_question = n_system
        late = [i for i, c in enumerate(counts) if c and i != first_question]
        if late:
            fail(f": the {IMAGE_TAG!r} tag is in turn {late[0]}; the question asked is turn {first_question}",
                 IMAGE_TAGS)
    else:
        raise ValueError(f"image_tags must be 'one', 'at_most_one' or 'any', got {image_tags!r}")
    return messages


def confined_image_path(image_dir, name: str, where: str, rid: str | None = None) -> Path | None:
    """image_dir / name, or DataError when the name reaches outside image_dir (checked by name
    alone when image_dir is None: no absolute path, no '..')."""
    try:
        if image_dir is None:  # the name alone: a link can only be followed inside a folder
            problem = relative_name_problem(name)
            if problem:
                raise ValueError(f"image {name!r} {problem}")
            return None
        return inside(image_dir, name, "image")
    except ValueError as err:
        raise DataError(f"{where}: {err}; refused, nothing was opened", IMAGE_OUTSIDE, rid) from None


def image_name_candidates(name: str) -> tuple[str, str]:
    """The names a record's picture may be stored under: its own, then the original SFT naming."""
    return name, ORIGINAL_SFT_PREFIX + name


def find_image(image_dir, name: str, where: str = "", rid: str | None = None) -> Path:
    """The picture file of a record's image name: ``image_dir / name`` when it exists, else
    ``image_dir / ("COCO_train2014_" + name)`` when that exists (the original's SFT naming), else
    ``image_dir / name`` (opening it then says there is no such file). Either is confined to
    image_dir: DataError (kind IMAGE_OUTSIDE) for a name that leads out, nothing opened."""
    plain = confined_image_path(image_dir, name, where, rid)
    if plain is None or os.path.lexists(plain):
        return plain
    if os.path.lexists(Path(image_dir) / (ORIGINAL_SFT_PREFIX + name)):
        return confined_image_path(image_dir, ORIGINAL_SFT_PREFIX + name, where, rid)
    return plain


def stored_image_name(image_dir, name: str) -> str:
    """The name (relative to image_dir) under which the record's picture ``name`` is stored:
    ``name`` or ``"COCO_train2014_" + name``, as :func:`find_image` finds it."""
    path = find_image(image_dir, name)
    return Path(path).relative_to(Path(image_dir)).as_posix()


def relative_name_problem(name) -> str | None:
    """Why ``name`` is not a plain relative file name (None when it is): checked by the name alone."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return "is not a file name"
    candidate = Path(name)
    if candidate.is_absolute() or candidate.drive or ".." in candidate.parts:
        return "must be a relative name inside its folder (no absolute path, no '..')"
    return None


def skip_summary(skipped: Sequence[Skipped], what: str = "bad sample(s)", examples: int = 5) -> str:
    """One line for a log: how many were skipped, how many for each reason, the first few by name.

    (Every skipped record is in the list itself; a run keeps it whole, e.g. in a JSON file.)
    """
    if not skipped:
        return f"skipped 0 {what}"
    per_kind = Counter(s.kind for s in skipped)
    kinds = ", ".join(f"{n} {kind}" for kind, n in per_kind.most_common())
    named = "; ".join(f"{s.id!r}: {s.message}" for s in skipped[:examples])
    more = f"; and {len(skipped) - examples} more" if len(skipped) > examples else ""
    return f"skipped {len(skipped)} {what} ({kinds}): {named}{more}"
