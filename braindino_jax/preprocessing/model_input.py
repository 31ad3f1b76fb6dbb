"""Prepared slices → the array the ViT takes: NHWC float32, foreground z-scored.

The same transform the training pipeline ends with (``data.augment``): stored uint8 pixels u
become (u - fg_mean) / fg_std on the foreground (u > 0) and ``background`` elsewhere, and the
grayscale channel is repeated to three unless the model takes one (``in_chans=1``, e.g. after
``braindino-convert --in-chans 1``).
"""

from __future__ import annotations

import numpy as np

from braindino_jax.preprocessing.volume import PreparedVolume


def model_input(volume: PreparedVolume, in_chans: int = 3, background: float = 0.0) -> np.ndarray:
    """[N, size, size, in_chans] float32 for ``volume``'s N kept slices."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans: expected 1 or 3, got {in_chans!r}")
    pixels = volume.slices.astype(np.float32)
    z = np.where(volume.slices > 0, (pixels - np.float32(volume.fg_mean)) / np.float32(volume.fg_std),
                 np.float32(background))
    return np.repeat(z[..., None], in_chans, axis=-1)
