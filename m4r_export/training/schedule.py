"""Learning-rate schedules over a run's budget (config key ``lr_schedule``).

* ``constant`` -- ``learning_rate`` throughout (RecBole's and the reference's behaviour).
* ``cosine``   -- ``learning_rate * (1 + cos(pi * p)) / 2``, from the full rate down to zero.
* ``linear``   -- ``learning_rate * (1 - p)``.

``p`` is the run's progress in ``[0, 1]``. With a time budget (``--max-minutes``) it is the share of
the budget spent, measured from the start of the run (so it reaches 1 exactly when the budget ends,
whatever the machine's speed): a decaying rate is what makes a short, budgeted run end on a settled
model instead of a noisy one (Li et al., "Budgeted Training", ICLR 2020). Without a time budget it is
the share of ``epochs x batches`` done. A resumed run keeps the progress it had reached and spends
its own budget on the rest of the schedule.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, progress: float) -> float:
    """The multiplier of ``learning_rate`` at ``progress`` (clamped to ``[0, 1]``)."""
    p = min(1.0, max(0.0, progress))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - p
    raise ValueError(f"unknown lr_schedule {schedule!r} (one of {', '.join(LR_SCHEDULES)})")


def run_progress(start: float, budget_share: float) -> float:
    """Progress of a run that began at ``start`` and has used ``budget_share`` of its own budget."""
    return min(1.0, start + (1.0 - start) * min(1.0, max(0.0, budget_share)))


__all__ = ["LR_SCHEDULES", "lr_factor", "run_progress"]
