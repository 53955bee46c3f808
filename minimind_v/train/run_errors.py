"""Why a run refuses to start: the errors a run raises before its first step.

Each message says what is wrong and what to do (most often: pass the flags the run was trained
with, ``--resume``, or ``--overwrite``).
"""

from __future__ import annotations

START_AGAIN = "start again with --overwrite"


class TrainSetupError(ValueError):
    """A run refused before its first step; the message says what is wrong and what to do."""


class CheckpointError(TrainSetupError):
    """A checkpoint file that cannot be used (unreadable, refused, incomplete, or not this model's)."""


class ResumeMismatchError(TrainSetupError):
    """``--resume`` with settings other than the checkpoint's: it would no longer be the same run."""


class RunFolderError(TrainSetupError):
    """The output folder holds an earlier run and neither --resume nor --overwrite was given."""


class MetricsError(TrainSetupError):
    """``metrics.jsonl`` is damaged before its last line."""

