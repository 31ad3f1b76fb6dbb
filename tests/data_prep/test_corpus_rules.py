"""What a real corpus brings: BIDS trees with labels and derivatives, 4D series, globs and
modality filters (skipped, never failed), and shards that do not depend on where files live."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from braindino_jax.cli import prep
from braindino_jax.data import manifest, records, shards
from braindino_jax.preprocessing.phantom import write_phantom

SMALL = ["--spacing", "none", "--size", "32", "--margin", "2", "--no-progress", "--workers", "1"]


def _bids_tree(root: Path) -> None:
    """Two subjects' anatomy, their label images, a derivatives/ tree, DWI and BOLD series."""
    for i, sub in enumerate(("sub-01", "sub-02")):
        anat = root / sub / "ses-1" / "anat"
        for modality in ("T1w", "FLAIR"):
            image, _ = write_phantom(anat / f"{sub}_ses-1_{modality}.nii.gz", i, spacing=(4.0, 4.0, 4.0),
                                     label_path=anat / f"{sub}_ses-1_{modality}_dseg.nii.gz", skull_stripped=True)
        img = nib.load(image)
        volume = np.asanyarray(img.dataobj)
        for folder, name, n in (("dwi", "dwi", 3), ("func", "task-rest_bold", 4)):
            (root / sub / "ses-1" / folder).mkdir(parents=True)
            nib.save(nib.Nifti1Image(np.stack([volume] * n, -1), img.affine),
                     root / sub / "ses-1" / folder / f"{sub}_ses-1_{name}.nii.gz")
        nib.save(nib.Nifti1Image((volume > 0).astype(np.uint8), img.affine),
                 anat / f"{sub}_ses-1_desc-brain_mask.nii.gz")
    derivatives = root / "derivatives" / "fmriprep" / "sub-01" / "anat"
    shutil.copytree(root / "sub-01" / "ses-1" / "anat", derivatives)


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name if "derivatives" not in r["path"] else "derivatives/" + Path(r["path"]).name: r
            for r in manifest.read_manifest(out / "manifest.jsonl")}


def test_bids_tree_keeps_images_and_skips_labels_derivatives_and_4d(tmp_path, capsys):
    _bids_tree(tmp_path / "bids")
    out = tmp_path / "out"
    code = prep.main(["--root", f"study={tmp_path / 'bids'}", "--out", str(out), "--four-d-policy", "skip", *SMALL])
    assert code == 0  # 15 of 19 inputs skipped, none failed
    rows = _rows(out)
    prepared = sorted(name for name, r in rows.items() if r["status"] == manifest.OK)
    assert prepared == ["sub-01_ses-1_FLAIR.nii.gz", "sub-01_ses-1_T1w.nii.gz",
                        "sub-02_ses-1_FLAIR.nii.gz", "sub-02_ses-1_T1w.nii.gz"]
    assert {r["status"] for r in rows.values()} == {manifest.OK, manifest.SKIPPED}
    assert "label image (file-name suffix _dseg)" in rows["sub-01_ses-1_T1w_dseg.nii.gz"]["reason"]
    assert "suffix _mask" in rows["sub-02_ses-1_desc-brain_mask.nii.gz"]["reason"]
    assert "BIDS derivatives/ folder" in rows["derivatives/sub-01_ses-1_T1w.nii.gz"]["reason"]
    assert rows["sub-01_ses-1_dwi.nii.gz"]["reason"] == "4D image with 3 volumes and four_d_policy='skip'"
    assert {r.modality for s in shards.list_shards(out, "slices")
            for r in map(records.decode, shards.read_array_record(s))} == {"T1w", "FLAIR"}
    text = capsys.readouterr().out
    assert "19 listed, 4 ok (0 reused from an earlier run), 0 failed, 15 skipped" in text
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["totals"]["volumes"]["skipped"] == 15 and card["totals"]["volumes"]["failed"] == 0


def test_modality_filter_and_exclude_globs(tmp_path):
    _bids_tree(tmp_path / "bids")
    out = tmp_path / "out"
    assert prep.main(["--root", f"study={tmp_path / 'bids'}", "--out", str(out), "--modality", "flair",
                      "--exclude", "sub-02/*", *SMALL]) == 0
    rows = _rows(out)
    assert [n for n, r in rows.items() if r["status"] == manifest.OK] == ["sub-01_ses-1_FLAIR.nii.gz"]
    assert rows["sub-02_ses-1_FLAIR.nii.gz"]["reason"] == "matches --exclude 'sub-02/*'"
    assert rows["sub-01_ses-1_T1w.nii.gz"]["reason"] == "modality 'T1w' is not one of --modality flair"
    # Kept on request: label images and derivatives.
    again = tmp_path / "again"
    assert prep.main(["--root", f"study={tmp_path / 'bids'}", "--out", str(again), "--include-labels",
                      "--include-derivatives", "--modality", "dseg", *SMALL]) == 0
    kept = sorted(n for n, r in _rows(again).items() if r["status"] == manifest.OK)
    assert len(kept) == 6 and "derivatives/sub-01_ses-1_T1w_dseg.nii.gz" in kept


def test_a_skipped_4d_file_is_never_a_failure(tmp_path):
    """One anatomical image and four 4D series under --four-d-policy skip: 80% of the inputs are
    left out on purpose, and the run succeeds."""
    inputs = tmp_path / "in"
    image, _ = write_phantom(inputs / "sub-01_T1w.nii.gz", 0, spacing=(4.0, 4.0, 4.0), skull_stripped=True)
    img = nib.load(image)
    for k in range(4):
        nib.save(nib.Nifti1Image(np.stack([np.asanyarray(img.dataobj)] * 2, -1), img.affine),
                 inputs / f"sub-0{k + 2}_bold.nii.gz")
    out = tmp_path / "out"
    assert prep.main(["--root", str(inputs), "--out", str(out), "--four-d-policy", "skip", *SMALL]) == 0
    statuses = [r["status"] for r in manifest.read_manifest(out / "manifest.jsonl")]
    assert statuses.count(manifest.SKIPPED) == 4 and statuses.count(manifest.OK) == 1


def test_shards_do_not_depend_on_where_the_files_are(tmp_path):
    """The same files in two folders, prepared into two outputs, give byte-identical shards;
    records name files by dataset and path under the root, the manifest by absolute path."""
    first = tmp_path / "a" / "in"
    for i in range(2):
        write_phantom(first / f"sub-0{i}" / f"sub-0{i}_T1w.nii.gz", i, spacing=(4.0, 4.0, 4.0), skull_stripped=True)
    second = tmp_path / "elsewhere" / "deeper" / "in"
    shutil.copytree(first, second)
    for root, out in ((first, tmp_path / "a" / "out"), (second, tmp_path / "b" / "out")):
        assert prep.main(["--root", f"ds={root}", "--out", str(out), *SMALL]) == 0
    a, b = shards.list_shards(tmp_path / "a" / "out", "slices"), shards.list_shards(tmp_path / "b" / "out", "slices")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    sources = {records.decode(r).source_path for p in a for r in shards.read_array_record(p)}
    assert sources == {"ds/sub-00/sub-00_T1w.nii.gz", "ds/sub-01/sub-01_T1w.nii.gz"}
    row = manifest.read_manifest(tmp_path / "b" / "out" / "manifest.jsonl")[0]
    assert row["path"] == str(second / "sub-00" / "sub-00_T1w.nii.gz")
    assert row["source_path"] == "ds/sub-00/sub-00_T1w.nii.gz"
