"""Model selection on val: keep the best state seen, stop after ``patience`` evaluations
without improvement. Shared by the feature heads and the segmentation decoders."""

from __future__ import annotations

from typing import Any


class EarlyStopping:
    def __init__(self, patience: int, initial_state: Any):
        self.patience = patience
        self.best_score: Any = None  # anything ordered: a float, or a (score, tie-break) tuple
        self.best_state = initial_state
        self.best_step = 0
        self._since = 0

    def update(self, score: Any, state: Any, step: int) -> bool:
        """Record an evaluation; True when training should stop."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_state, self.best_step, self._since = score, state, step, 0
            return False
        self._since += 1
        return self._since >= self.patience
