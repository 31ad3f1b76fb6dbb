"""BrainDINO-JAX: a DINOv3-style self-supervised foundation model for brain MRI in JAX/Flax."""

__version__ = "0.1.0"
