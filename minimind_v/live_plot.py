"""A training job's progress, read from the ``metrics.jsonl`` its rank 0 appends to: a tqdm bar
over the steps and, in Jupyter, a loss curve redrawn in place every few seconds."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from .metrics import draw_loss_curves, is_number, loss_curves, parse_record

PLOT_EVERY_S = 2.0  # the live loss curve is redrawn at most this often


class MetricsWatch:
    """Follows the job's metrics file: a tqdm bar over the steps (the total from a
    ``{"total_steps": N}`` record) and, in Jupyter, a loss curve redrawn in place.

    What is in the file when the job starts is an earlier run's and is skipped; a file that is
    replaced or cut back while the job runs (a stage starting afresh, or resuming) is read from
    its start. A line is read once it is complete."""

    def __init__(self, path: Path | None, name: str, plot: bool):
        self.path, self.name, self.plot = path, name, plot
        self.records: list[dict] = []
        self.losses: dict[str, list[tuple[float, float]]] = {}  # "loss", "val_loss", ... -> points
        self.bar = self.display = None
        self.total, self.dirty, self.drawn_at = None, False, 0.0
        self.inode, self.offset = self._stat()
        self.rest = b""  # the start of a line not yet complete

    def _stat(self) -> tuple[int | None, int]:
        try:
            st = os.stat(self.path)
            return st.st_ino, st.st_size
        except (FileNotFoundError, TypeError):  # not there yet, or no file to follow
            return None, 0

    def poll(self, final: bool = False) -> None:
        inode, size = self._stat()
        if inode != self.inode or size < self.offset:
            self.inode, self.offset, self.rest = inode, 0, b""
        if size > self.offset:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read(size - self.offset)
            except OSError:  # replaced just now: next time
                return
            self.offset += len(data)
            *complete, self.rest = (self.rest + data).split(b"\n")
            for line in complete:
                record = parse_record(line)
                if record is not None:
                    self.records.append(record)
                    self._add(record)
        if self.plot and self.dirty and (final or time.monotonic() - self.drawn_at >= PLOT_EVERY_S):
            self._draw()

    def _add(self, record: dict) -> None:
        if is_number(record.get("total_steps")):
            self.total = int(record["total_steps"])
        step = record.get("step")
        if not is_number(step):
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, desc=self.name, unit="step", dynamic_ncols=True)
        if is_number(record.get("loss")):
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)
        for key, points in loss_curves([record]).items():
            self.losses.setdefault(key, []).extend(points)
            self.dirty = True

    def _draw(self) -> None:
        """Loss against step, drawn off-screen (no pyplot: no window, nothing shown behind our
        back), displayed once as a PNG and then replaced in place."""
        from IPython.display import Image, display
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
        draw_loss_curves(fig.subplots(), self.losses, self.name, total_steps=self.total)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        image = Image(data=buffer.getvalue(), format="png")
        if self.display is None:
            self.display = display(image, display_id=True)
        else:
            self.display.update(image)
        self.dirty, self.drawn_at = False, time.monotonic()

    def close(self) -> None:
        self.poll(final=True)
        if self.bar is not None:
            self.bar.close()
