"""A training run's metrics.jsonl: one JSON object per line, appended by rank 0 as it trains
(``{"total_steps": N}``, then ``{"step": s, "loss": ..., ...}`` records, then a summary).
One reader and one loss plot, for the chapters' figures and for the live curve of a job."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def is_number(value) -> bool:
    """A finite int or float (not a bool): a value worth plotting."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_record(line: str | bytes) -> dict | None:
    """The record on one line, or None for a line that is blank, not JSON or not an object
    (a job's last line may be cut off mid-write)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every record of a finished stage's metrics.jsonl; a damaged line is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}; has the stage run?")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
    return records


def loss_curves(records: list[dict], keys: tuple[str, ...] | None = None) -> dict[str, list[tuple[float, float]]]:
    """{"loss": [(step, value), ...], "val_loss": ...}: every ``*loss`` field of the step records
    (only ``keys``, when given), in the order the records come."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        if is_number(record.get("step")):
            for key, value in record.items():
                if key.endswith("loss") and (keys is None or key in keys) and is_number(value):
                    curves.setdefault(key, []).append((record["step"], value))
    return curves


def draw_loss_curves(ax, curves: dict[str, list[tuple[float, float]]], title: str, ylabel: str = "loss",
                     total_steps: int | None = None):
    """Loss against step on ``ax``, one line per curve (dots while a curve is short)."""
    for key, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if total_steps:
        ax.set_xlim(0, total_steps)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return ax


def plot_loss(records: list[dict], title: str, ax=None):
    """A stage's training loss against step, from its metrics records (the chapters' figure)."""
    import matplotlib.pyplot as plt

    curves = loss_curves(records, keys=("loss",))
    if not curves:
        raise ValueError(f"{title}: the metrics hold no (step, loss) records")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    draw_loss_curves(ax, curves, title, ylabel="training loss")
    ax.figure.tight_layout()
    return ax.figure
