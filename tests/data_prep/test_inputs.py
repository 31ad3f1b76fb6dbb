"""Input listing: BIDS names, CSV metadata, duplicates and subject exclusion."""

from pathlib import Path

import pytest

from braindino_jax.data.inputs import (
    InputError,
    InputVolume,
    discover,
    find_duplicates,
    is_excluded,
    parse_bids_name,
    read_csv,
    read_exclusions,
)


def test_bids_names():
    assert parse_bids_name("/d/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz") == {
        "subject": "sub-01", "session": "ses-1", "modality": "T1w"}
    assert parse_bids_name("/d/sub-7/anat/sub-7_acq-fast_run-2_FLAIR.nii") == {
        "subject": "sub-7", "modality": "FLAIR"}
    # Entities only in folder names; a non-BIDS file name gives no modality.
    assert parse_bids_name("/d/sub-03/ses-b/scan.nii.gz") == {"subject": "sub-03", "session": "ses-b"}
    assert parse_bids_name("/d/brain.hdr") == {}


def test_discover_roots_and_patterns(tmp_path):
    for rel in ["sub-01/anat/sub-01_T2w.nii.gz", "sub-02/anat/sub-02_T2w.nii", "notes.txt", "x/scan.hdr", "x/scan.img"]:
        (tmp_path / "ds" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ds" / rel).write_bytes(b"")
    found = discover([f"mine={tmp_path / 'ds'}"], default_modality="MR")
    assert [Path(v.path).name for v in found] == ["sub-01_T2w.nii.gz", "sub-02_T2w.nii", "scan.hdr"]
    assert found[0] == InputVolume(str(tmp_path / "ds/sub-01/anat/sub-01_T2w.nii.gz"), "mine", "sub-01", "", "T2w",
                                   "sub-01/anat/sub-01_T2w.nii.gz")
    assert found[0].source == "mine/sub-01/anat/sub-01_T2w.nii.gz"
    assert (found[2].subject, found[2].modality) == ("scan", "MR")
    assert discover([str(tmp_path / "ds")], ["**/*.nii"])[0].dataset == "ds"
    with pytest.raises(InputError, match="not a directory"):
        discover([str(tmp_path / "nope")])


def test_csv_overrides_names_and_reports_bad_columns(tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,dataset,subject,modality\nimgs/sub-04_T1w.nii.gz,adni,S4,\n/abs/a.nii,,,DWI\n")
    got = read_csv(csv_path)
    assert got[0] == InputVolume(str(tmp_path / "imgs/sub-04_T1w.nii.gz"), "adni", "S4", "", "T1w",
                                 "imgs/sub-04_T1w.nii.gz")
    assert got[1] == InputVolume("/abs/a.nii", "list", "a", "", "DWI", "a.nii")
    csv_path.write_text("file,subject\na.nii,1\n")
    with pytest.raises(InputError, match="'path' column"):
        read_csv(csv_path)
    csv_path.write_text("path,age\na.nii,3\n")
    with pytest.raises(InputError, match="unknown CSV columns"):
        read_csv(csv_path)


def test_duplicates_by_real_path(tmp_path):
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "link.nii").symlink_to(tmp_path / "a.nii")
    vols = [InputVolume(str(p), "d", "s", "", "m") for p in
            (tmp_path / "a.nii", tmp_path / "link.nii", tmp_path / "b.nii", tmp_path / "a.nii")]
    assert find_duplicates(vols) == [None, str(tmp_path / "a.nii"), None, str(tmp_path / "a.nii")]


def test_exclusions(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("sub-01  # eval\n\nadni/7\n")
    ex = read_exclusions(path)
    assert is_excluded(InputVolume("p", "any", "01", "", "m"), ex)
    assert is_excluded(InputVolume("p", "adni", "sub-7", "", "m"), ex)
    assert not is_excluded(InputVolume("p", "oasis", "sub-7", "", "m"), ex)
    with pytest.raises(InputError, match="exclusion list"):
        read_exclusions(tmp_path / "missing.txt")
