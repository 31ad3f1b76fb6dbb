"""Installable package for BrainDINO-JAX."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'__version__ = "([^"]+)"', Path("braindino_jax/__init__.py").read_text()
).group(1)

setup(
    name="braindino_jax",
    version=VERSION,
    description="JAX/Flax reimplementation of BrainDINO, a DINOv3-style foundation model for brain MRI",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["braindino_jax*", "data_prep*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "array-record>=0.7",
        "nibabel>=5.2",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "scipy>=1.12",
        "msgpack>=1.0",
        "safetensors>=0.4",
        "pillow>=10",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "scikit-learn>=1.4",
        "lifelines>=0.28",
        "matplotlib>=3.8",
    ],
    extras_require={
        # CPU-only torch is enough; the upper bound keeps pip on the release this machine ships.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # tensorboard's own event reader checks the event files tensorboardX writes.
            "tensorboard>=2.15",
            "torch>=2.4,<=2.14.1",
            "torchvision>=0.19,<=0.29.1",
            "timm>=1.0.20",
            # An established second reference for the DINO, iBOT, KoLeo and Sinkhorn tests.
            "lightly>=1.5",
        ],
        "beam": ["apache-beam>=2.60"],
    },
    entry_points={
        "console_scripts": [
            "braindino-prep=braindino_jax.cli.prep:main",
            "braindino-convert=braindino_jax.cli.convert:main",
            "braindino-preview=braindino_jax.cli.preview:main",
            "braindino-train=braindino_jax.cli.train:main",
            "braindino-probe=braindino_jax.cli.probe:main",
            "braindino=braindino_jax.cli.demo:main",
        ],
    },
)
