"""Did the run learn? A run whose loss ends where it started, or whose validation recall
a random ranking would reach, says so in its last lines: everything built on it after
(evaluation, an index, search, the page) would work on noise."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

from phoclip.evaluation.retrieval import chance_recall

logger = logging.getLogger(__name__)

LOSS_DROP = 0.05
"""The last logged loss must be at least this fraction below the first one."""
CHANCE_SE = 3.0
"""Recall within this many standard errors of a random ranking's is at chance: on 16
validation images R@1 up to 24% (chance 6.2%) is what a random ranking can reach."""


@dataclass
class LearningCheck:
    """The first and last training loss this job read, judged with the last validation
    recall at the run's end (`report`)."""

    first: Optional[tuple[int, float]] = None
    last: Optional[tuple[int, float]] = None

    def saw(self, step: int, metrics: dict) -> None:
        """Note a step's figures (those the host read; non-finite losses ignored)."""
        loss = metrics.get("loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return
        if self.first is None:
            self.first = (step, float(loss))
        self.last = (step, float(loss))

    def loss_moved(self) -> Optional[bool]:
        """Whether the loss ended LOSS_DROP below its start; None with fewer than two steps read."""
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return self.last[1] <= self.first[1] * (1.0 - LOSS_DROP)

    def report(self, val: Optional[dict]) -> Optional[str]:
        """Log one warning (and return it) when the loss has not moved or the validation
        recall (`val`: the evaluator's result for the validation set) is at chance;
        None when the run learned or there is too little to judge."""
        moved = self.loss_moved()
        chance = recall_at_chance(val) if val else None
        if moved is not False and not chance:
            return None
        parts = []
        if moved is not None:
            (s0, l0), (s1, l1) = self.first, self.last
            parts.append(f"loss {l0:.3f} at step {s0} and {l1:.3f} at step {s1}"
                         + (" (not moved from its start)" if not moved else ""))
        if val:
            n = int(val.get("n_images", 0))
            parts.append(f"validation R@1 text→image {val['t2i_R@1']:.1f} image→text {val['i2t_R@1']:.1f} "
                         f"(chance {chance_recall(n, 1):.1f} on {n} images" + (", so at chance)" if chance else ")"))
        message = ("this run has not learned: " + "; ".join(parts) + ". Train longer or with higher learning "
                   "rates (on a CPU, launch/configs/small-cpu.yaml learns on a few dozen photos); an index or "
                   "search built on this model finds noise")
        logger.warning("%s", message)
        return message


def recall_at_chance(val: dict) -> bool:
    """Whether R@1 both ways is within CHANCE_SE standard errors of a random ranking's
    (text→image over its captions, image→text over its images)."""
    n = int(val.get("n_images", 0))
    if n < 2 or "t2i_R@1" not in val or "i2t_R@1" not in val:
        return False
    p = 1.0 / n
    queries = {"t2i_R@1": int(val.get("n_captions", n)) or n, "i2t_R@1": n}
    return all(val[k] / 100.0 <= p + CHANCE_SE * math.sqrt(p * (1 - p) / q) for k, q in queries.items())
