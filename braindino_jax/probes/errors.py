"""The two ways a probe run is refused: a bad configuration, or a bad task input.

Both are raised before any work that the error would waste: a config is validated before an
encoder is loaded, and the task CSV is checked (columns, label types, files) before extraction.
"""

from __future__ import annotations


class ProbeConfigError(ValueError):
    """An invalid probe configuration; the message starts with the offending field."""


class ProbeInputError(ValueError):
    """A task CSV or input file that cannot be used; the message names the file, row and column."""
