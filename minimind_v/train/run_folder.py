"""What a run leaves in its folder besides the checkpoint, and refusing to mix two runs there.

* An earlier run's files (checkpoint, metrics, completion mark) make a new run stop unless
  ``--resume`` or ``--overwrite`` says what to do (`refuse_earlier_run`).
* ``metrics.jsonl``: `prepare_out_dir` starts it afresh or cuts it back to the step resumed at
  (`kept_metrics`); `append_metrics` adds a line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..runfiles import COMPLETE, atomic_write_text, clear_complete
from .run_errors import START_AGAIN, MetricsError, RunFolderError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def earlier_run_files(out_dir: Path) -> list[str]:
    return [name for name in (CHECKPOINT, METRICS, COMPLETE) if (out_dir / name).exists()]


def refuse_earlier_run(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunFolderError` when ``out_dir`` holds an earlier run and neither ``resume`` nor
    ``overwrite`` says what to do with it (entry points call it first, before any slow loading)."""
    if not resume and not overwrite:
        found = earlier_run_files(Path(out_dir))
        if found:
            raise RunFolderError(f"{out_dir} already holds {', '.join(found)} from an earlier run: pass --resume "
                                 "to continue or --overwrite to start again")


def kept_metrics(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` a run resumed at ``step`` keeps: records of steps up to
    ``step`` and records without a step (the header), not the summaries of earlier runs.

    A torn last line (a write cut short by a kill) is dropped; damage before it raises
    :class:`MetricsError` naming the file and line.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    body, last = lines[:-1], lines[-1]  # last is "" when the file ends with a newline, as it should
    kept = []
    for number, line in enumerate(body + ([last] if last else []), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as err:
            if number == len(body) + 1:  # the unterminated last line: torn by a kill
                print(f"note: dropped the torn last line of {path} (line {number})", file=sys.stderr, flush=True)
                break
            raise MetricsError(f"{path} line {number} is not a JSON record ({err}): {line[:80]!r}; the file is "
                               f"damaged before its end: repair or delete that line, or {START_AGAIN}") from None
        if "summary" in record or record.get("step", 0) > step:
            continue
        kept.append(line)
    return kept


def prepare_out_dir(out_dir: Path, start_step: int, header: dict) -> None:
    """Before a run writes anything (rank 0): withdraw the completion mark, drop temporary files of
    killed writes, and start ``metrics.jsonl`` afresh (step 0, with the old checkpoint deleted, so
    the folder holds this run only) or cut it back to ``start_step``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_complete(out_dir)
    for stale in out_dir.glob(f"{CHECKPOINT}.*.tmp"):
        stale.unlink(missing_ok=True)
    metrics = out_dir / METRICS
    if start_step == 0:
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
        atomic_write_text(metrics, json.dumps(header) + "\n")
    else:
        lines = kept_metrics(metrics, start_step) + [json.dumps({"resumed_at_step": start_step, **header})]
        atomic_write_text(metrics, "".join(line + "\n" for line in lines))


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


