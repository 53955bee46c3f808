"""One check for a conversation record, shared by training (ChatDataset) and evaluation.

A record is ``{"id", "image", "conversations": [{"from": "human", "value": "...<image>..."},
{"from": "gpt", "value": "..."}, ...]}``. Every way it can be wrong raises a :class:`DataError`
that names the record (its id, or ``#index`` without one) and the file, and carries a short
``kind`` so that a run that skips bad records can say how many it dropped for each reason.

The image name a record gives is a name *inside* the dataset's image folder: an absolute path,
a ``..`` or a link that leads out of the folder is refused before anything is opened.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from ..runfiles import inside
from ..tokenizer import IMAGE_TAG

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
    image: str | None  # the image name as the record gives it (None when no image is needed)
    image_path: Path | None  # image_dir / image, confined to image_dir (None without image_dir)
    turns: list  # the conversation turns, as in the record


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

    need_image: the record must name an image file, inside ``image_dir`` when that is given
    (never opened here). image_tags: "one" (training: exactly one <image>, in a human turn),
    "at_most_one" (evaluation: the question may leave it out, it is put in front), or "any"
    (text-only training drops the tags).
    """
    rid = record_id(record, index)
    where = f"record {rid!r} in {json_path}"

    def fail(problem: str, kind: str):
        raise DataError(f"{where}{problem}", kind, rid)

    if not isinstance(record, dict):
        fail(f" is a {type(record).__name__}, not an object", NOT_AN_OBJECT)
    image = record.get("image")
    image_path = None
    if need_image:
        if not isinstance(image, str) or not image.strip():
            fail(" has no 'image' file name", NO_IMAGE_NAME)
        image_path = confined_image_path(image_dir, image, where, rid)
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        fail(" needs a 'conversations' list with a question and an answer", NO_CONVERSATION)
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        fail(": every turn needs a string 'value'", BAD_TURN)
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            fail(f": turn {i} is from {turn.get('from')!r}, expected {expected!r} "
                 f"(turns alternate human, gpt, ...)", TURN_ORDER)
    # An empty answer would teach the model to stop at once; a silent default is wrong.
    for i in range(1, len(turns), 2):
        if not turns[i]["value"].strip():
            fail(f": turn {i} (an answer) is empty", EMPTY_ANSWER)
    if need_image and image_tags != "any":
        counts = [t["value"].count(IMAGE_TAG) for t in turns]
        total = sum(counts)
        if image_tags == "one" and total == 0:
            fail(f": no turn holds the {IMAGE_TAG} tag (where does the picture go?)", IMAGE_TAGS)
        if total > 1:
            fail(f": {total} {IMAGE_TAG!r} tags, expected exactly 1", IMAGE_TAGS)
        if total == 1:
            turn = counts.index(1)
            if turn % 2 == 1:
                fail(f": the {IMAGE_TAG!r} tag is in turn {turn}, an answer; it belongs in a human turn",
                     IMAGE_TAGS)
            if image_tags == "at_most_one" and turn != 0:
                fail(f": the {IMAGE_TAG!r} tag is in turn {turn}; the question asked is turn 0", IMAGE_TAGS)
    return CheckedRecord(rid, image if need_image else None, image_path, turns)


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
