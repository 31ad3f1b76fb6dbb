"""Errors raised by preprocessing: a bad input volume, an input left out on purpose, a bad config.

A batch job catches VolumeError per file, records ``path`` and ``reason`` in its manifest and
goes on (VolumeSkipped as "skipped", which never counts as a failure); ConfigError stops the job
up front because every volume would fail the same way.
"""

from __future__ import annotations

import os


class VolumeError(Exception):
    """A volume that cannot be turned into slices; str() is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Keeps the two-argument constructor working when a process pool sends it back.
        return (type(self), (self.path, self.reason))


class VolumeSkipped(VolumeError):
    """A readable volume the configuration leaves out (a 4D series under four_d_policy="skip",
    a field of view too small to be a brain, thick slices that are not axial)."""


class ConfigError(ValueError):
    """An invalid setting; ``field`` names it (e.g. "PrepConfig.margin"), ``problem`` says why.

    str() is ``"<field>: <problem>"``; a command-line face can name its own flag instead.
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self):
        return (type(self), (self.field, self.problem))
