"""A probe task on the built-in phantoms, so the whole probe path runs with no external data.

Each subject is a skull-stripped phantom head (T1w and FLAIR of the same anatomy), half of them
with lesions: by default two to four tumour-sized ones (semi-axes 10-22 mm, 20-90 ml in all).
Smaller lesions (the phantom's MS-like default) are nearly invisible once a volume's 16 slices
of 96 px are mean-pooled: every encoder, even raw pixels, then scores near chance. The task
CSV holds, per subject: the lesion label (present/absent), the lesion volume in ml
(regression), a synthetic survival time that shortens with lesion volume (with an event flag,
about a fifth censored), and a tissue label map for segmentation.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from braindino_jax.data.atomic_file import temp_name
from braindino_jax.preprocessing.phantom import LABELS, make_phantom

# Segmentation classes of the phantom task, background first; values in the written label maps.
TISSUE_CLASSES = ("background", "csf", "grey_matter", "white_matter", "lesion")
_TISSUE_OF_LABEL = {
    LABELS["csf"]: 1, LABELS["ventricles"]: 1, LABELS["grey_matter"]: 2,
    LABELS["white_matter"]: 3, LABELS["lesion"]: 4,
}
_ORIENTATIONS = ("RAS", "LPS", "LAS", "PIR")
CSV_NAME = "task.csv"
SURVIVAL_ML = 30.0  # lesion volume (ml) that shortens the synthetic survival time e-fold
COLUMNS = ("subject", "t1", "flair", "mask_path", "lesion", "lesion_ml", "time", "event")


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.dtype(dtype))  # integer storage gets a scaling slope, as from a scanner
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)


def _tissue_map(labels: np.ndarray, brain: np.ndarray) -> np.ndarray:
    out = np.zeros(labels.shape, np.uint8)
    for label, tissue in _TISSUE_OF_LABEL.items():
        out[(labels == label) & brain] = tissue
    return out


def write_phantom_task(
    out_dir: str | os.PathLike,
    n_subjects: int = 24,
    seed: int = 0,
    spacing: float = 2.0,
    lesion_count: tuple[int, int] = (2, 4),
    lesion_axes_mm: tuple[float, float] = (10.0, 22.0),
) -> Path:
    """Write the phantom volumes and ``task.csv`` under ``out_dir`` (once) and return the CSV.

    The folder is written under a temporary name and renamed, so an interrupted run leaves no
    half-written task behind. Relative paths in the CSV are relative to its folder.
    """
    if n_subjects < 4:
        raise ValueError(f"n_subjects: expected >= 4, got {n_subjects}")
    out_dir = Path(out_dir)
    csv_path = out_dir / CSV_NAME
    if csv_path.is_file():
        return csv_path
    tmp = out_dir.parent / temp_name(out_dir.name)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rng = np.random.default_rng([seed, 7])
    rows = []
    for i in range(n_subjects):
        subject = f"sub-{i + 1:03d}"
        lesions = i % 2 == 1
        orientation = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
        paths = {}
        for modality, column in (("T1w", "t1"), ("FLAIR", "flair")):
            phantom = make_phantom(
                seed * 100_000 + i, spacing=(spacing,) * 3, orientation=orientation,
                modality=modality, lesions=lesions, skull_stripped=True,
                lesion_count=lesion_count, lesion_axes_mm=lesion_axes_mm,
            )
            rel = Path("images", f"{subject}_{modality}.nii.gz")
            _save(phantom.image, phantom.affine, tmp / rel, "int16")
            paths[column] = rel.as_posix()
        brain = phantom.image > 0
        tissue = _tissue_map(phantom.labels, brain)
        mask_rel = Path("images", f"{subject}_dseg.nii.gz")
        _save(tissue, phantom.affine, tmp / mask_rel, "uint8")
        lesion_ml = float(np.count_nonzero(tissue == 4)) * spacing**3 / 1000.0
        months = 36.0 * np.exp(-lesion_ml / SURVIVAL_ML) * float(rng.lognormal(0.0, 0.25))
        event = int(rng.random() < 0.8)
        time = months if event else months * float(rng.uniform(0.4, 1.0))
        rows.append({
            "subject": subject, **paths, "mask_path": mask_rel.as_posix(),
            "lesion": "present" if lesions else "absent", "lesion_ml": f"{lesion_ml:.4f}",
            "time": f"{time:.3f}", "event": event,
        })
    with open(tmp / CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return csv_path

