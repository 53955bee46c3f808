"""A training step that fails saves the last completed step before its error goes on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .distributed import (DistInfo, check_in_wait_s, explain_communication_failure, is_communication_error,
                          is_distributed, ranks_not_answering)


class StepGuard:
    """Tracks the last completed optimizer step, and on a failed step saves it before the error goes on.

    ``save(step)`` writes the checkpoint. A failed collective (a rank gone or frozen) becomes a
    `RankTimeoutError` naming the ranks that stopped answering; then only rank 0 saves (the ranks
    hold the same weights). Any other error saves on the rank that raised it.
    """

    def __init__(self, save: Callable[[int], None], start_step: int, info: DistInfo, checkpoint: Path):
        self.save, self.start, self.info, self.checkpoint = save, start_step, info, checkpoint
        self.done, self.saved, self.updating = start_step, None, False

    def completed(self, step: int) -> None:
        self.done, self.updating = step, False

    def fail(self, err: Exception, step: int) -> BaseException:
        """The exception to raise for ``err`` raised in ``step`` (1-based), after saving what can be saved."""
        communication = is_distributed() and is_communication_error(err)
        if self.done >= step:  # it failed after the update (logging, saving): that step is complete
            step_words = f"after step {step} (in its {'collective' if communication else 'logging or saving'})"
        else:
            step_words = f"in step {step}"
        missing, saves = None, True
        if communication and not self.info.is_main:
            # Rank 0 saves (first thing, before torchrun may stop the job); if rank 0 is the one
            # gone, the first rank still answering does (the ranks hold the same weights).
            missing = ranks_not_answering(check_in_wait_s())
            live = [r for r in range(self.info.world_size) if r not in missing]
            saves = 0 in missing and self.info.rank == min(live)
        if self.done == self.start:
            note = (f"training stopped {step_words} ({type(err).__name__}) before any step of this run "
                    f"completed: no new checkpoint was written")
            if self.checkpoint.exists():
                note += f"; {self.checkpoint} holds the earlier one: --resume continues from it"
        elif self.updating:
            note = (f"training stopped {step_words} during the optimizer update: the weights are half "
                    f"updated, so no checkpoint was written")
        elif not saves:
            saver = "rank 0" if 0 not in missing else "another rank"
            note = f"training stopped {step_words}; {saver} saves the checkpoint"
        else:
            try:
                if self.saved != self.done:
                    self.save(self.done)
                note = (f"training stopped {step_words} ({type(err).__name__}); the last completed step, "
                        f"{self.done}, is saved in {self.checkpoint}: once the cause is fixed (e.g. the data), "
                        f"--resume continues from it")
            except Exception as save_err:
                note = f"training stopped {step_words}, and saving step {self.done} failed too: {save_err}"
        if communication:
            return explain_communication_failure(err, step_words, note, missing)
        if hasattr(err, "add_note"):
            err.add_note(note)
        else:  # Python 3.10
            print(note, file=sys.stderr, flush=True)
        return err
