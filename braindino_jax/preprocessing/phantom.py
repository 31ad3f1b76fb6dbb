"""A seeded synthetic brain phantom, written as NIfTI, for demos, tests and benchmarks.

The anatomy (scalp, skull, CSF with sulci and a midline fissure, cortex, white matter, deep grey
nuclei, lateral and third ventricles, optional lesions) is a function of *world* (RAS, mm)
coordinates only. A voxel grid with any affine (axis order, flips, spacing, oblique rotation)
samples that same function, so one seed written in LPS, RAS or an oblique frame shows the same
head: this is what lets tests check orientation handling end to end. Noise is per voxel; the
bias field is smooth and, like the anatomy, defined in world coordinates.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {
    "background": 0,
    "scalp": 1,
    "skull": 2,
    "csf": 3,
    "grey_matter": 4,
    "white_matter": 5,
    "ventricles": 6,
    "lesion": 7,
}

# Relative tissue intensities per contrast, indexed by label value (background first).
_CONTRASTS = {
    "T1w": (0.0, 0.85, 0.08, 0.18, 0.62, 1.00, 0.16, 0.40),
    "T2w": (0.0, 0.55, 0.06, 1.00, 0.62, 0.42, 1.00, 0.90),
    "FLAIR": (0.0, 0.60, 0.05, 0.07, 0.70, 0.50, 0.06, 1.00),
}
MODALITIES = tuple(_CONTRASTS)

# World axis (0 = x, 1 = y, 2 = z) and direction of each orientation code.
_AXCODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}

# Field of view (mm) along world x, y, z used when no shape is given: fits the largest head.
DEFAULT_FOV_MM = (176.0, 216.0, 176.0)
_STORAGE_SCALE = 800.0  # white matter on T1w stores around this value, like a typical scanner


@dataclasses.dataclass
class Phantom:
    """One synthetic acquisition: float32 image, uint8 tissue labels (see LABELS), affine."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    modality: str
    orientation: str


class _Anatomy:
    """Random but smooth head geometry, drawn once from a seed and evaluated at world points."""

    def __init__(self, rng: np.random.Generator, lesions: bool, lesion_count: tuple[int, int] = (2, 5),
                 lesion_axes_mm: tuple[float, float] = (3.0, 8.0), lesion_rng: np.random.Generator | None = None):
        self.center = rng.uniform(-3.0, 3.0, size=3)
        self.radii = np.array([68.0, 84.0, 62.0]) * rng.uniform(0.94, 1.06, size=3)
        # Low-order shape deformation (odd terms break front/back and top/bottom symmetry).
        self.shape_coef = rng.uniform(-0.05, 0.05, size=6)
        # Gyral folding: sums of plane waves over the direction sphere.
        self.fold_dirs = _unit_vectors(rng, 6)
        self.fold_freq = rng.uniform(9.0, 14.0, size=6)
        self.fold_phase = rng.uniform(0.0, 2 * np.pi, size=6)
        self.sulcus_dirs = _unit_vectors(rng, 4)
        self.sulcus_freq = rng.uniform(10.0, 16.0, size=4)
        self.sulcus_phase = rng.uniform(0.0, 2 * np.pi, size=4)
        # Lateral ventricles (left, right) deliberately unequal; third ventricle on the midline.
        self.ventricles = [
            (np.array([-9.0, 4.0, 12.0]) + rng.normal(0, 1.5, 3), np.array([5.0, 26.0, 9.0]) * rng.uniform(0.8, 1.1, 3)),
            (np.array([10.0, 4.0, 12.0]) + rng.normal(0, 1.5, 3), np.array([6.0, 29.0, 10.0]) * rng.uniform(0.9, 1.25, 3)),
            (np.array([0.0, -4.0, 0.0]), np.array([2.0, 12.0, 8.0])),
        ]
        self.deep_grey = [
            (np.array([-16.0, -6.0, 2.0]) + rng.normal(0, 1.0, 3), np.array([9.0, 13.0, 9.0])),
            (np.array([16.0, -6.0, 2.0]) + rng.normal(0, 1.0, 3), np.array([9.0, 13.0, 9.0])),
        ]
        self.bias_coef = rng.normal(0.0, 1.0, size=9)
        self.lesions = []
        rng = rng if lesion_rng is None else lesion_rng
        if lesions:
            for _ in range(int(rng.integers(lesion_count[0], lesion_count[1] + 1))):
                direction = _unit_vectors(rng, 1)[0]
                centre = direction * rng.uniform(0.35, 0.7) * self.radii
                axes = rng.uniform(*lesion_axes_mm, size=3)
                self.lesions.append((centre, axes))

    def labels(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue labels and the brain mask (what skull stripping keeps) at world points [..., 3]."""
        q = (p - self.center) / self.radii
        rho = np.sqrt(np.sum(q * q, axis=-1))
        u = q / np.maximum(rho, 1e-6)[..., None]
        ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
        c = self.shape_coef
        deform = 1.0 + c[0] * uy + c[1] * uz + c[2] * ux * uy + c[3] * uz * uz + c[4] * uy * uz + c[5] * ux * ux
        r = rho / deform
        fold = np.zeros_like(r)
        for d, f, ph in zip(self.fold_dirs, self.fold_freq, self.fold_phase):
            fold += np.sin(f * (u @ d) + ph)
        fold /= len(self.fold_dirs)
        sulci = np.zeros_like(r)
        for d, f, ph in zip(self.sulcus_dirs, self.sulcus_freq, self.sulcus_phase):
            sulci += np.sin(f * (u @ d) + ph)
        sulci /= len(self.sulcus_dirs)

        out = np.zeros(r.shape, np.uint8)
        out[r <= 1.19] = LABELS["scalp"]
        out[r <= 1.12] = LABELS["skull"]
        out[r <= 1.045] = LABELS["csf"]
        brain = r <= 1.0
        out[brain] = LABELS["grey_matter"]
        out[brain & (r <= 0.85 + 0.08 * fold)] = LABELS["white_matter"]
        out[brain & (r > 0.82) & (np.abs(sulci) < 0.05)] = LABELS["csf"]
        rel = p - self.center
        fissure = brain & (np.abs(rel[..., 0]) < 1.2) & (q[..., 2] > 0.3)
        out[fissure] = LABELS["csf"]
        for centre, axes in self.deep_grey:
            out[brain & (_ellipsoid_radius(rel, centre, axes) <= 1.0)] = LABELS["grey_matter"]
        for centre, axes in self.ventricles:
            out[brain & (_ellipsoid_radius(rel, centre, axes) <= 1.0)] = LABELS["ventricles"]
        parenchyma = (out == LABELS["white_matter"]) | (out == LABELS["grey_matter"])
        for centre, axes in self.lesions:
            out[parenchyma & (_ellipsoid_radius(rel, centre, axes) <= 1.0)] = LABELS["lesion"]
        return out, brain

    def bias(self, p: np.ndarray, strength: float) -> np.ndarray:
        """Smooth multiplicative field exp(strength * quadratic polynomial of world position)."""
        s = (p - self.center) / 100.0
        x, y, z = s[..., 0], s[..., 1], s[..., 2]
        b = self.bias_coef
        poly = b[0] * x + b[1] * y + b[2] * z + 0.5 * (b[3] * x * y + b[4] * y * z + b[5] * x * z + b[6] * x * x + b[7] * y * y + b[8] * z * z)
        return np.exp(strength * poly / 3.0)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ellipsoid_radius(p: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    d = (p - centre) / axes
    return np.sum(d * d, axis=-1)


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit axis."""
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def _axis_codes(orientation: str) -> str:
    """``orientation`` upper-cased, checked to name each world axis once (e.g. "LPS")."""
    codes = orientation.upper()
    if len(codes) != 3 or any(c not in _AXCODES for c in codes):
        raise ValueError(f"orientation: expected three axis codes from 'LRAPSI', got {orientation!r}")
    if sorted(_AXCODES[c][0] for c in codes) != [0, 1, 2]:
        raise ValueError(f"orientation: {orientation!r} does not name each of x, y and z once")
    return codes


def phantom_affine(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: str = "RAS",
    oblique_deg: float = 0.0,
    oblique_axis: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Voxel → world affine: voxel ``shape // 2`` sits at the world origin (the head centre).

    ``orientation`` uses nibabel's axis codes (the direction each voxel axis increases toward,
    e.g. "LPS", "RAS", "PIR"); ``oblique_deg`` then rotates the grid about ``oblique_axis``.
    """
    codes = _axis_codes(orientation)
    linear = np.zeros((3, 3))
    for axis, (code, step) in enumerate(zip(codes, spacing)):
        world, sign = _AXCODES[code]
        linear[world, axis] = sign * float(step)
    if oblique_deg:
        rot_axis = np.array(oblique_axis if oblique_axis is not None else (0.3, 0.8, 0.5), float)
        linear = _rotation(rot_axis / np.linalg.norm(rot_axis), oblique_deg) @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.asarray(shape) // 2)
    return affine


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    orientation: str = "RAS",
    oblique_deg: float = 0.0,
    modality: str = "T1w",
    lesions: bool = True,
    lesion_count: tuple[int, int] = (2, 5),
    lesion_axes_mm: tuple[float, float] = (3.0, 8.0),
    lesion_seed: int | None = None,
    skull_stripped: bool = False,
    noise: float = 0.02,
    bias: float = 0.2,
) -> Phantom:
    """Sample the head of ``seed`` on a grid with the given spacing, orientation and obliquity.

    ``shape`` defaults to the DEFAULT_FOV_MM field of view. ``noise`` is the Rician noise sigma
    relative to white matter; the oblique rotation axis is drawn from the seed, so the same seed
    and angle always give the same affine. ``skull_stripped`` zeroes everything outside the
    brain (CSF included), like the skull-stripped volumes BrainDINO was trained on. With
    ``lesions``, ``lesion_count`` (inclusive range) ellipsoids with semi-axes drawn from
    ``lesion_axes_mm`` replace parenchyma: the default is small, MS-like lesions; (10, 22) mm
    is tumour-sized. ``lesion_seed`` draws the lesions apart from the anatomy, so one head can
    carry different lesions (as follow-up sessions of one subject do).
    """
    if not 0 <= lesion_count[0] <= lesion_count[1]:
        raise ValueError(f"lesion_count: expected an inclusive range (lo, hi) with 0 <= lo <= hi, got {lesion_count!r}")
    if not 0 < lesion_axes_mm[0] <= lesion_axes_mm[1]:
        raise ValueError(f"lesion_axes_mm: expected (lo, hi) with 0 < lo <= hi, got {lesion_axes_mm!r}")
    if modality not in _CONTRASTS:
        raise ValueError(f"modality: expected one of {MODALITIES}, got {modality!r}")
    spacing = tuple(float(s) for s in spacing)
    codes = _axis_codes(orientation)
    if shape is None:
        shape = tuple(
            int(math.ceil(DEFAULT_FOV_MM[_AXCODES[c][0]] / s)) for c, s in zip(codes, spacing)
        )
    shape = tuple(int(n) for n in shape)
    anatomy_rng = np.random.default_rng([seed, 0])
    lesion_rng = None if lesion_seed is None else np.random.default_rng([lesion_seed, 5])
    anatomy = _Anatomy(anatomy_rng, lesions, lesion_count, lesion_axes_mm, lesion_rng)
    obl_axis = _unit_vectors(np.random.default_rng([seed, 2]), 1)[0]
    affine = phantom_affine(shape, spacing, codes, oblique_deg, tuple(obl_axis))

    contrast = np.asarray(_CONTRASTS[modality], np.float32) * _STORAGE_SCALE
    labels = np.empty(shape, np.uint8)
    image = np.empty(shape, np.float32)
    brain = np.empty(shape, bool)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    plane = np.stack([ii, jj], axis=-1).astype(np.float64) @ affine[:3, :2].T + affine[:3, 3]
    for k in range(shape[2]):
        points = plane + k * affine[:3, 2]
        lab, brain[:, :, k] = anatomy.labels(points)
        labels[:, :, k] = lab
        image[:, :, k] = contrast[lab] * anatomy.bias(points, bias)

    if noise > 0:
        noise_rng = np.random.default_rng([seed, 1, MODALITIES.index(modality)])
        sigma = np.float32(noise * _STORAGE_SCALE)
        real = image + sigma * noise_rng.standard_normal(shape, dtype=np.float32)
        imag = sigma * noise_rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
    if skull_stripped:
        image[~brain] = 0.0
    return Phantom(image=image, labels=labels, affine=affine, modality=modality, orientation=codes)


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: str, nifti_version: int) -> None:
    cls = nib.Nifti2Image if nifti_version == 2 else nib.Nifti1Image
    img = cls(data, affine)
    img.set_data_dtype(np.dtype(dtype))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def write_phantom(
    path: str | os.PathLike,
    seed: int,
    label_path: str | os.PathLike | None = None,
    dtype: str = "int16",
    nifti_version: int = 1,
    **phantom_kwargs,
) -> tuple[Path, Path | None]:
    """Write ``make_phantom(seed, **phantom_kwargs)`` to ``path`` (.nii or .nii.gz).

    Integer ``dtype`` makes nibabel store scaling slopes, as scanners do. Labels (uint8, see
    LABELS) are written only when ``label_path`` is given, so that a glob over the image folder
    never picks them up as images.
    """
    if nifti_version not in (1, 2):
        raise ValueError(f"nifti_version: expected 1 or 2, got {nifti_version!r}")
    phantom = make_phantom(seed, **phantom_kwargs)
    path = Path(path)
    _save(phantom.image, phantom.affine, path, dtype, nifti_version)
    if label_path is None:
        return path, None
    label_path = Path(label_path)
    _save(phantom.labels, phantom.affine, label_path, "uint8", nifti_version)
    return path, label_path


# (dataset, modality) of successive demo volumes; subjects of one dataset share their anatomy
# across modalities, as a real multi-contrast session does.
_DEMO_SERIES = (("demo-a", "T1w"), ("demo-a", "T2w"), ("demo-b", "FLAIR"), ("demo-b", "T1w"))
_DEMO_ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PIR", "ASL")
_DEMO_SPACINGS = ((1.5, 1.5, 1.5), (2.0, 2.0, 2.0), (1.2, 1.2, 2.0), (1.75, 1.75, 1.75))


def write_demo_dataset(
    out_dir: str | os.PathLike,
    n_volumes: int = 8,
    seed: int = 0,
    label_dir: str | os.PathLike | None = None,
    progress: Callable[[Path], None] | None = None,
    healthy_fraction: float = 0.0,
    lesion_count: tuple[int, int] = (2, 5),
    lesion_axes_mm: tuple[float, float] = (3.0, 8.0),
) -> list[Path]:
    """Write a small BIDS-style demo corpus and return the image paths.

    Layout: ``<out_dir>/<dataset>/sub-XX/ses-1/anat/sub-XX_ses-1_<modality>.nii.gz`` for two
    datasets and three modalities, skull-stripped, with varied orientations, spacings, some
    oblique. Labels, if wanted, mirror that layout under ``label_dir`` with a ``_dseg`` suffix.
    ``progress`` is called with each image path once it is written (a phantom takes a second
    or so). Each subject (all its modalities) is lesion-free with probability
    ``healthy_fraction``; the others carry lesions as in ``make_phantom``.
    """
    if n_volumes < 1:
        raise ValueError(f"n_volumes: expected >= 1, got {n_volumes}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction: expected a fraction in [0, 1], got {healthy_fraction}")
    rng = np.random.default_rng([seed, 3])
    paths = []
    for i in range(n_volumes):
        dataset, modality = _DEMO_SERIES[i % len(_DEMO_SERIES)]
        subject = f"{i // len(_DEMO_SERIES) + 1:02d}"
        rel = Path(dataset, f"sub-{subject}", "ses-1", "anat", f"sub-{subject}_ses-1_{modality}.nii.gz")
        label = None if label_dir is None else Path(label_dir, str(rel).replace(".nii.gz", "_dseg.nii.gz"))
        anatomy_seed = seed * 1000 + (i // len(_DEMO_SERIES)) * 10 + (0 if dataset == "demo-a" else 1)
        healthy = np.random.default_rng([anatomy_seed, 4]).random() < healthy_fraction
        image, _ = write_phantom(
            Path(out_dir, rel),
            anatomy_seed,
            label_path=label,
            lesions=not healthy,
            lesion_count=lesion_count,
            lesion_axes_mm=lesion_axes_mm,
            modality=modality,
            orientation=_DEMO_ORIENTATIONS[int(rng.integers(len(_DEMO_ORIENTATIONS)))],
            spacing=_DEMO_SPACINGS[int(rng.integers(len(_DEMO_SPACINGS)))],
            oblique_deg=float(rng.choice([0.0, 0.0, 8.0, 15.0])),
            skull_stripped=True,
        )
        paths.append(image)
        if progress is not None:
            progress(image)
    return paths


def write_sessions_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int = 6,
    sessions: int = 4,
    seed: int = 0,
    modalities: tuple[str, ...] = ("FLAIR", "T1w"),
    spacing: float = 2.0,
    lesion_count: tuple[int, int] = (1, 3),
    lesion_axes_mm: tuple[float, float] = (6.0, 20.0),
    label_dir: str | os.PathLike | None = None,
    progress: Callable[[Path], None] | None = None,
) -> list[Path]:
    """A longitudinal BIDS corpus: each head scanned in ``sessions`` sessions, the first
    lesion-free (a baseline) and each later one with its own lesions, drawn apart from the
    anatomy.

    This is the demo's pretraining corpus. Telling apart slices of one head is then a matter of
    its lesions, so DINO's teacher learns them; on a few heads that always carry lesions, the
    anatomy alone tells slices apart and the teacher ignores lesions. Layout:
    ``<out_dir>/sessions/sub-XX/ses-N/anat/sub-XX_ses-N_<modality>.nii.gz``, skull-stripped,
    isotropic ``spacing``, varied orientations; labels mirror it under ``label_dir``.
    """
    if n_subjects < 1 or sessions < 1:
        raise ValueError(f"n_subjects, sessions: expected >= 1, got {n_subjects}, {sessions}")
    rng = np.random.default_rng([seed, 6])
    paths = []
    for subject in range(n_subjects):
        anatomy_seed = 500 + seed * 1000 + subject
        for session in range(sessions):
            for modality in modalities:
                name = f"sub-{subject + 1:02d}_ses-{session + 1}_{modality}.nii.gz"
                rel = Path("sessions", f"sub-{subject + 1:02d}", f"ses-{session + 1}", "anat", name)
                label = None if label_dir is None else Path(label_dir, str(rel).replace(".nii.gz", "_dseg.nii.gz"))
                image, _ = write_phantom(
                    Path(out_dir, rel), anatomy_seed, label_path=label, modality=modality,
                    lesions=session > 0, lesion_count=lesion_count, lesion_axes_mm=lesion_axes_mm,
                    lesion_seed=anatomy_seed * 1000 + session, skull_stripped=True, spacing=(spacing,) * 3,
                    orientation=_DEMO_ORIENTATIONS[int(rng.integers(len(_DEMO_ORIENTATIONS)))],
                )
                paths.append(image)
                if progress is not None:
                    progress(image)
    return paths
