"""Orientation invariance, resampling accuracy and in-plane framing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.preprocessing.resampling import needs_resampling, resample
from braindino_jax.preprocessing.volume import preprocess_volume

SPACING = (2.0, 2.0, 2.0)
CONFIG = PrepConfig(target_spacing=SPACING, size=112, margin=4)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """One head (seed 5) written in four frames; returns {name: (path, PreparedVolume)}."""
    root = tmp_path_factory.mktemp("orient")
    frames = {"RAS": ("RAS", 0.0), "LPS": ("LPS", 0.0), "PIR": ("PIR", 0.0), "oblique": ("LAS", 12.0)}
    out = {}
    for name, (codes, deg) in frames.items():
        path, _ = write_phantom(root / f"{name}.nii.gz", 5, orientation=codes, oblique_deg=deg,
                                spacing=SPACING, noise=0.0, skull_stripped=True, dtype="float32")
        (result,) = preprocess_volume(path, CONFIG)
        out[name] = (path, result)
    return out




@pytest.mark.parametrize("name", ["LPS", "PIR"])
def test_flipped_and_permuted_frames_give_identical_slices(phantoms, name):
    ref, other = phantoms["RAS"][1], phantoms[name][1]
    assert other.orientation == name and ref.orientation == "RAS"
    np.testing.assert_array_equal(other.slices, ref.slices)
    assert (other.fg_mean, other.fg_std) == pytest.approx((ref.fg_mean, ref.fg_std), rel=1e-6)
    assert other.spacing == pytest.approx(SPACING)


def test_wrong_left_right_would_be_detected(phantoms):
    # Guards the test above: the phantom is not left-right symmetric.
    ref = phantoms["RAS"][1].slices
    assert np.mean(np.abs(ref.astype(int) - ref[:, :, ::-1].astype(int))) > 5


def _best_shift_error(a, b):
    """Mean |a - b| over the union of foreground, minimised over +-1 pixel shifts."""
    best = np.inf
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            s = np.roll(b, (dr, dc), axis=(0, 1)).astype(float)
            fg = (a > 0) | (s > 0)
            best = min(best, np.abs(a.astype(float) - s)[fg].mean())
    return best


def test_oblique_frame_gives_the_same_slices_within_interpolation_error(phantoms):
    ref_path, ref = phantoms["RAS"]
    obl_path, obl = phantoms["oblique"]
    # World z of each slice: RAS has voxel shape // 2 at the origin, the resampled grid starts
    # on the first lattice point above the lowest corner of the rotated field of view.
    ref_img, obl_img = nib.load(ref_path), nib.load(obl_path)
    ref_z = (ref.slice_indices - ref_img.shape[2] // 2) * SPACING[2]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in obl_img.shape], indexing="ij")).reshape(3, -1)
    z_min = (obl_img.affine[:3, :3] @ corners + obl_img.affine[:3, 3:4])[2].min()
    obl_z = (np.ceil(z_min / SPACING[2] - 1e-6) + obl.slice_indices) * SPACING[2]
    common = np.intersect1d(ref_z, obl_z)
    assert len(common) >= len(ref_z) - 4  # at most the edge slices differ
    errors = [
        _best_shift_error(ref.slices[np.flatnonzero(ref_z == z)[0]], obl.slices[np.flatnonzero(obl_z == z)[0]])
        for z in common[5:-5]
    ]
    assert np.median(errors) < 15, errors  # uint8 levels, at the phantom's hard tissue edges
    # Control: a mismatched slice pair is far outside that tolerance.
    assert _best_shift_error(ref.slices[len(ref.slices) // 2], obl.slices[5]) > 3 * np.median(errors)


def test_linear_ramp_is_resampled_exactly_even_when_oblique():
    rng = np.random.default_rng(0)
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.0, 3.0, 1.5])
    affine[:3, 3] = [-10.3, 4.2, 7.7]
    shape = (15, 12, 18)
    coef = rng.normal(size=3)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    ramp = (world @ coef + 100.0).astype(np.float32)
    out, out_affine = resample(ramp, affine, (1.0, 1.0, 1.0), "linear")
    assert np.allclose(out_affine[:3, :3], np.eye(3))
    assert np.allclose(out_affine[:3, 3], np.round(out_affine[:3, 3]))  # on the 1 mm lattice
    out_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).astype(float)
    out_world = out_ijk + out_affine[:3, 3]
    src = (out_world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((src >= 0) & (src <= np.array(shape) - 1), axis=-1)
    assert inside.sum() > 0.3 * out.size
    np.testing.assert_allclose(out[inside], (out_world @ coef + 100.0)[inside], atol=2e-3)


def test_cubic_beats_linear_on_a_smooth_signal():
    x = np.arange(40) * 3.0
    signal = np.sin(x / 9.0)[:, None, None] * np.ones((1, 4, 4))
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    truth = np.sin(np.arange(118) / 9.0)
    errs = {}
    for kind in ("linear", "cubic"):
        out, out_affine = resample(signal.astype(np.float32), affine, (1.0, 1.0, 1.0), kind)
        assert out.shape[0] == 118 and out_affine[0, 3] == 0.0
        errs[kind] = np.abs(out[10:-10, 1, 1] - truth[10:-10]).max()
    assert errs["cubic"] < errs["linear"] / 5


def test_nearest_keeps_the_label_set_and_dtype():
    rng = np.random.default_rng(1)
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[4:16, 4:16, 4:16] = 3
    labels[8:12, 8:12, 8:12] = 7
    labels[rng.random(labels.shape) < 0.02] = 5
    affine = np.diag([1.2, 1.2, 2.5, 1.0])
    out, _ = resample(labels, affine, (1.0, 1.0, 1.0), "nearest")
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 3, 5, 7} and {0, 3, 7} <= set(np.unique(out))
    # Volume of the big cube is preserved to within a voxel layer.
    assert np.sum(out == 3) * 1.0 == pytest.approx(np.sum(labels == 3) * 1.2 * 1.2 * 2.5, rel=0.15)


def test_matching_spacing_skips_resampling(tmp_path, blob):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(blob().astype(np.int16), np.diag([1.0, 1.0, 1.0, 1.0])), path)
    assert not needs_resampling(np.eye(4), (1.0, 1.0, 1.0))
    assert needs_resampling(np.diag([1.0, 1.0, 1.2, 1.0]), (1.0, 1.0, 1.0))
    (a,) = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=(1.0, 1.0, 1.0), size=48))
    (b,) = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=None, size=48))
    np.testing.assert_array_equal(a.slices, b.slices)


def _ellipse_volume(rx, ry, nz=6):
    """RAS volume holding an elliptic cylinder with semi-axes rx (left-right), ry (front-back)."""
    x = np.arange(-rx - 5, rx + 6)[:, None]
    y = np.arange(-ry - 5, ry + 6)[None, :]
    disc = (x / rx) ** 2 + (y / ry) ** 2 <= 1
    ramp = 50.0 + (x - x.min()) + 0.0 * y  # varied intensity so the clip range is not empty
    return np.repeat((disc * ramp)[:, :, None], nz, axis=2)


@pytest.mark.parametrize("rx,ry", [(20, 10), (100, 50), (40, 120)])
def test_in_plane_framing_keeps_aspect_ratio(tmp_path, rx, ry):
    path = tmp_path / "e.nii"
    nib.save(nib.Nifti1Image(_ellipse_volume(rx, ry).astype(np.int16), np.eye(4)), path)
    size = 96
    (res,) = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=None, size=size, margin=0))
    img = res.slices[0] > 0
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1  # rows: front-back
    assert width / height == pytest.approx(rx / ry, rel=0.06)
    if max(rx, ry) * 2 + 1 <= size:
        assert (width, height) == (2 * rx + 1, 2 * ry + 1)  # padded, not enlarged
    else:
        assert max(width, height) >= size - 1  # shrunk to fit, not cropped
    # Centred: the margins on opposite sides differ by at most one pixel.
    assert abs(rows[0] - (size - 1 - rows[-1])) <= 1 and abs(cols[0] - (size - 1 - cols[-1])) <= 1


def test_display_orientation_anterior_up_left_on_left(tmp_path):
    data = np.zeros((30, 40, 5), np.int16)
    data[2:6, 30:38, :] = 200  # patient-left (low x), anterior (high y) corner
    data[10:28, 2:38, :] = np.maximum(data[10:28, 2:38, :], 50)
    path = tmp_path / "o.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    (res,) = preprocess_volume(path, PrepConfig(min_extent_mm=0, target_spacing=None, size=64, margin=0))
    s = res.slices[0]
    bright = np.argwhere(s == 255)
    fg = np.argwhere(s > 0)
    assert bright[:, 0].mean() < fg[:, 0].mean()  # anterior at the top
    assert bright[:, 1].mean() < fg[:, 1].mean()  # patient left on the left
