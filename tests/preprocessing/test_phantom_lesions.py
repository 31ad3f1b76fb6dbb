"""The phantom's lesion controls: how many, how large, and which demo subjects are healthy."""

import math

import nibabel as nib
import numpy as np
import pytest

from braindino_jax.preprocessing.phantom import LABELS, make_phantom, write_demo_dataset, write_sessions_dataset

SPACING = (3.0, 3.0, 3.0)


def _lesion_ml(seed: int, **kwargs) -> float:
    phantom = make_phantom(seed, spacing=SPACING, noise=0.0, **kwargs)
    return float(np.count_nonzero(phantom.labels == LABELS["lesion"])) * math.prod(SPACING) / 1000.0


def test_lesion_size_and_count_follow_their_ranges():
    small = [_lesion_ml(s) for s in range(4)]
    large = [_lesion_ml(s, lesion_axes_mm=(12.0, 20.0), lesion_count=(1, 3)) for s in range(4)]
    # Each lesion is an ellipsoid of semi-axes <= hi, clipped to parenchyma: its volume bounds the count.
    assert all(0 < v <= 5 * 4 / 3 * math.pi * 8.0**3 / 1000.0 for v in small), small
    assert all(4 / 3 * math.pi * 12.0**3 / 1000.0 * 0.3 < v <= 3 * 4 / 3 * math.pi * 20.0**3 / 1000.0
               for v in large), large
    assert min(large) > max(small)
    assert _lesion_ml(0, lesion_count=(0, 0)) == 0.0
    assert _lesion_ml(0, lesions=False, lesion_axes_mm=(12.0, 20.0)) == 0.0


def test_lesions_leave_the_rest_of_the_anatomy_alone():
    """Lesions are drawn after the anatomy: a healthy and a lesioned phantom of one seed differ
    only where the lesioned one has lesion voxels."""
    healthy = make_phantom(3, spacing=SPACING, noise=0.0, lesions=False).labels
    lesioned = make_phantom(3, spacing=SPACING, noise=0.0, lesion_axes_mm=(10.0, 15.0)).labels
    differ = healthy != lesioned
    assert differ.any()
    assert np.all(lesioned[differ] == LABELS["lesion"])


def test_lesion_seed_gives_one_head_different_lesions():
    """Follow-up sessions of one subject: the same anatomy, lesions drawn apart from it."""
    first, second, again = (make_phantom(3, spacing=SPACING, noise=0.0, lesion_axes_mm=(8.0, 14.0), lesion_seed=s).labels
                            for s in (1, 2, 1))
    lesion = LABELS["lesion"]
    np.testing.assert_array_equal(first, again)
    assert np.any((first == lesion) != (second == lesion))
    outside = (first != lesion) & (second != lesion)
    np.testing.assert_array_equal(first[outside], second[outside])


@pytest.mark.parametrize("field, kwargs", [
    ("lesion_count", {"lesion_count": (3, 1)}),
    ("lesion_count", {"lesion_count": (-1, 2)}),
    ("lesion_axes_mm", {"lesion_axes_mm": (0.0, 5.0)}),
    ("lesion_axes_mm", {"lesion_axes_mm": (9.0, 4.0)}),
])
def test_bad_lesion_ranges_name_their_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        make_phantom(0, spacing=SPACING, **kwargs)


def test_demo_dataset_healthy_fraction_is_per_subject(tmp_path):
    with pytest.raises(ValueError, match="healthy_fraction"):
        write_demo_dataset(tmp_path / "bad", n_volumes=1, healthy_fraction=1.5)
    lesion_voxels = {}
    for fraction in (0.0, 0.5, 1.0):
        labels = tmp_path / f"labels_{fraction}"
        paths = write_demo_dataset(tmp_path / f"images_{fraction}", n_volumes=4, label_dir=labels,
                                   healthy_fraction=fraction)
        assert len(paths) == 4
        for path in sorted(labels.rglob("*_dseg.nii.gz")):
            subject = (fraction, path.parts[-5], path.parts[-4])  # dataset, sub-XX
            count = int(np.count_nonzero(np.asarray(nib.load(path).dataobj) == LABELS["lesion"]))
            lesion_voxels.setdefault(subject, []).append(count)
    by_fraction = {f: [v for (g, *_), v in lesion_voxels.items() if g == f] for f in (0.0, 0.5, 1.0)}
    assert all(min(v) > 0 for v in by_fraction[0.0])
    assert all(max(v) == 0 for v in by_fraction[1.0])
    # Every modality of one subject agrees: all lesioned or all healthy.
    assert all(min(v) > 0 or max(v) == 0 for v in by_fraction[0.5])


def test_sessions_dataset_shares_the_head_and_draws_lesions_per_session(tmp_path):
    labels = tmp_path / "labels"
    paths = write_sessions_dataset(tmp_path / "images", n_subjects=2, sessions=3, modalities=("T1w",),
                                   spacing=4.0, label_dir=labels)
    assert [p.parts[-4:-2] for p in paths] == [(f"sub-0{s}", f"ses-{n}") for s in (1, 2) for n in (1, 2, 3)]
    with pytest.raises(ValueError, match="sessions"):
        write_sessions_dataset(tmp_path / "bad", sessions=0)
    for subject in ("sub-01", "sub-02"):
        maps = [np.asarray(nib.load(p).dataobj) for p in sorted((labels / "sessions" / subject).rglob("*_dseg.nii.gz"))]
        lesion = [m == LABELS["lesion"] for m in maps]
        assert not lesion[0].any() and lesion[1].any() and lesion[2].any()  # a healthy baseline, then lesions
        assert lesion[1].sum() != lesion[2].sum()
        heads = [np.count_nonzero(m) for m in maps]  # one head, sampled in other orientations
        assert max(heads) - min(heads) < 0.03 * heads[0]
