"""Volume → axial slices: orientation, resampling, masks, intensity, slice selection (pure numpy)."""

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.errors import ConfigError, VolumeError, VolumeSkipped
from braindino_jax.preprocessing.model_input import model_input
from braindino_jax.preprocessing.volume import PreparedVolume, preprocess_series, preprocess_volume

__all__ = [
    "ConfigError", "PrepConfig", "PreparedVolume", "VolumeError", "VolumeSkipped", "model_input",
    "preprocess_series", "preprocess_volume",
]
