"""Errors raised by preprocessing: one for a bad input volume, one for a bad configuration.

A batch job catches VolumeError per file, records ``path`` and ``reason`` in its manifest and
goes on; ConfigError stops the job up front because every volume would fail the same way.
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


class ConfigError(ValueError):
    """An invalid preprocessing configuration; the message names the offending field."""
