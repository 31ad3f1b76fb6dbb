"""The local runner end to end: bad inputs, shards vs. preprocess_volume, resume after a crash."""

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import grain
import nibabel as nib
import numpy as np
import pytest

from braindino_jax.cli import prep
from braindino_jax.data import manifest, records, shards
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.preprocessing.volume import preprocess_volume
from braindino_jax.data.inputs import InputVolume
from data_prep import local_runner
from data_prep.volume_task import prepare_volume

SMALL = ["--spacing", "none", "--size", "32", "--margin", "2", "--no-progress"]
CONFIG = PrepConfig(target_spacing=None, size=32, margin=2)


def _write_good(folder: Path, n: int) -> list[Path]:
    orientations = ["RAS", "LPS", "PIR", "LAS", "RPI", "ASL"]
    return [
        write_phantom(folder / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz", i,
                      spacing=(4.0, 4.0, 4.0), orientation=orientations[i % 6], skull_stripped=True)[0]
        for i in range(n)
    ]


def _shard_records(out: Path) -> list[list[records.SliceRecord]]:
    """Every shard's records, read the way training reads them (Grain)."""
    out_shards = []
    for path in shards.list_shards(out, "slices"):
        source = grain.sources.ArrayRecordDataSource([str(path)])
        out_shards.append([records.decode(source[i]) for i in range(len(source))])
    return out_shards


def _expected_records(path: Path, dataset: str, subject: str, root: Path) -> list[records.SliceRecord]:
    """What the shards must hold for a volume, straight from preprocess_volume; records name
    the file by its dataset and its path under the root."""
    out = []
    for vol in preprocess_volume(path, CONFIG):
        for pixels, index in zip(vol.slices, vol.slice_indices):
            out.append(records.SliceRecord(
                pixels=pixels, dataset=dataset, subject=subject, session="", modality="T1w",
                source_path=f"{dataset}/{path.relative_to(root).as_posix()}", slice_index=int(index), n_slices=vol.n_slices,
                spacing=vol.spacing, fg_mean=vol.fg_mean, fg_std=vol.fg_std, volume_index=vol.volume_index))
    return out


BAD_CASES = {
    "sub-90_T1w.nii.gz": "truncated",
    "sub-91_T1w.nii.gz": "corrupt",
    "sub-92_T1w.nii": "do not match the header",
    "sub-93_T1w.nii.gz": "2D",
    "sub-94_T1w.nii.gz": "5D",
    "sub-95_T1w.nii.gz": "zero",
    "sub-96_T1w.nii.gz": "NaN",
    "sub-97_T1w.nii": "not a readable NIfTI",
    "sub-98_T1w.nii.gz": "dangling symbolic link",
}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """One run over a folder mixing 3 good volumes with every kind of bad input."""
    root = tmp_path_factory.mktemp("mixed")
    inputs = root / "in"
    good = _write_good(inputs, 3)
    bad = inputs / "bad"
    bad.mkdir()
    data = good[0].read_bytes()
    (bad / "sub-90_T1w.nii.gz").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[200:264] = b"\xff" * 64  # breaks the deflate stream itself
    (bad / "sub-91_T1w.nii.gz").write_bytes(bytes(corrupt))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4)), bad / "sub-92_T1w.nii")
    header = bytearray((bad / "sub-92_T1w.nii").read_bytes())
    header[46:48] = np.int16(16).tobytes()  # dim[3] = 16: the header now wants twice the data
    (bad / "sub-92_T1w.nii").write_bytes(bytes(header))
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), bad / "sub-93_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2, 2), np.float32), np.eye(4)), bad / "sub-94_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.int16), np.eye(4)), bad / "sub-95_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)), bad / "sub-96_T1w.nii.gz")
    (bad / "sub-97_T1w.nii").write_text("not a NIfTI file\n" * 30)
    os.symlink(bad / "missing" / "gone.nii.gz", bad / "sub-98_T1w.nii.gz")  # unreadable
    os.symlink(good[1], inputs / "zz-duplicate_T1w.nii.gz")  # the same file listed twice
    out = root / "out"
    return {"good": good, "inputs": inputs, "out": out}


def test_bad_inputs_are_recorded_and_good_volumes_kept(mixed_run, capsys):
    out, good = mixed_run["out"], mixed_run["good"]
    argv = ["--root", f"ds={mixed_run['inputs']}", "--out", str(out), "--workers", "2", *SMALL]
    assert prep.main(argv) == 1  # 9 of 12 attempted volumes failed, above the default 0.2
    printed = capsys.readouterr().out

    rows = manifest.read_manifest(out / "manifest.jsonl")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 13
    for name, reason in BAD_CASES.items():
        row = by_name[name]
        assert row["status"] == manifest.FAILED, name
        assert reason.lower() in row["reason"].lower(), (name, row["reason"])
        assert f"{row['path']}: {row['reason']}" in printed
    duplicate = by_name["zz-duplicate_T1w.nii.gz"]
    assert duplicate["status"] == manifest.DUPLICATE and str(good[1]) in duplicate["reason"]
    assert "3 ok" in printed and "9 failed" in printed and "1 duplicate" in printed

    # Every good volume's slices are in the shards, exactly as preprocess_volume made them.
    got = Counter(records.encode(r) for shard in _shard_records(out) for r in shard)
    expected = Counter()
    for i, path in enumerate(good):
        want = _expected_records(path, "ds", f"sub-{i:02d}", mixed_run["inputs"])
        assert by_name[path.name]["status"] == manifest.OK
        assert by_name[path.name]["slices_kept"] == len(want) > 0
        expected.update(records.encode(r) for r in want)
    assert got == expected

    card = json.loads((out / "dataset_card.json").read_text())
    assert card["totals"]["volumes"] == {"ok": 3, "failed": 9, "skipped": 0, "skipped-excluded": 0,
                                         "skipped-duplicate": 1}
    # The last line says why the exit code is 1, with the numbers.
    assert printed.rstrip().splitlines()[-1] == (
        "9 of 12 attempted volumes failed (75%), more than --max-failure-fraction 0.2: exit code 1")
    assert card["totals"]["slices"] == sum(expected.values())
    assert card["preprocessing"] == CONFIG.to_dict()
    pixels = np.concatenate([r.pixels.ravel() for s in _shard_records(out) for r in s]).astype(np.float64)
    stats = card["totals"]["pixels"]
    assert stats["pixels"] == pixels.size
    assert stats["mean"] == pytest.approx(pixels.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(pixels.std(), rel=1e-9)
    assert stats["foreground_mean"] == pytest.approx(pixels[pixels > 0].mean(), rel=1e-12)
    assert stats["foreground_std"] == pytest.approx(pixels[pixels > 0].std(), rel=1e-9)
    assert card["per_dataset"]["ds"]["slices"] == card["totals"]["slices"]
    assert (out / "qc" / "sample_ds.png").is_file() and (out / "qc" / "worst_foreground.png").is_file()

    # A tolerant re-run reuses the good volumes, retries the failures and exits 0.
    assert prep.main(argv + ["--max-failure-fraction", "1.0"]) == 0
    assert "(3 reused from an earlier run)" in capsys.readouterr().out
    assert Counter(records.encode(r) for shard in _shard_records(out) for r in shard) == expected


def test_corrupt_gzip_with_valid_deflate_is_refused(mixed_run, tmp_path):
    """A gzip member whose data decode but whose CRC is wrong is still corrupt."""
    data = bytearray(mixed_run["good"][0].read_bytes())
    body = gzip.decompress(bytes(data))
    bad = bytearray(gzip.compress(body, mtime=0))
    bad[-8] ^= 0xFF  # CRC32 of the trailer
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(bytes(bad))
    result = prepare_volume(0, InputVolume(str(path), "ds", "sub-01", "", "T1w"), CONFIG)
    assert result.row["status"] == manifest.FAILED and result.records == []


def test_empty_input_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = prep.main(["--root", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *SMALL])
    assert code == 2
    assert "no input volumes found" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("slices-*"))


def test_bad_options_name_the_flag(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    base = ["--root", str(root), "--out", str(tmp_path / "o")]
    for flags, message in [
        (["--size", "4"], "--size: expected an integer >= 8, got 4"),
        (["--margin", "200"], "--margin: expected an integer in [0, 128) (below half the output size 256), got 200"),
        (["--shard-size", "0"], "--shard-size: expected a size >= 1, got 0"),
        (["--workers", "0"], "--workers: expected an integer >= 1, got 0"),
        (["--max-slice-upsampling", "0.5"], "--max-slice-upsampling: expected None or a number >= 1, got 0.5"),
    ]:
        assert prep.main(base + flags) == 2
        assert capsys.readouterr().err == f"braindino-prep: error: {message}\n"


def test_every_validated_field_has_its_flag():
    """Errors name flags through data_prep.options.FLAGS: every field a check can name is in it."""
    import dataclasses

    from data_prep.options import FLAGS, build_parser

    fields = {f"PrepConfig.{f.name}" for f in dataclasses.fields(PrepConfig)}
    fields |= {"workers", "shard_prefix", "target_shard_records", "target_shard_bytes",
               "max_failure_fraction", "qc_per_dataset", "qc_worst"}
    assert fields == set(FLAGS)
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert set(FLAGS.values()) <= flags


def test_resume_after_crash_writes_the_same_shards(tmp_path, monkeypatch, capsys):
    """Crash after 2 of 5 volumes (and leave stray temp files); the re-run matches a clean run."""
    inputs = tmp_path / "in"
    _write_good(inputs, 5)
    base = ["--root", f"ds={inputs}", "--workers", "1", "--shard-size", "7", *SMALL]

    assert prep.main(base + ["--out", str(tmp_path / "clean")]) == 0

    calls = []
    real = local_runner.process_cached

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C in the middle of the third volume looks like
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(local_runner, "process_cached", crash_after_two)
    resumed = tmp_path / "resumed"
    assert prep.main(base + ["--out", str(resumed)]) == 130
    assert not (resumed / "manifest.jsonl").exists()
    assert len(list((resumed / "_work").glob("*.json"))) == 2
    (resumed / "_work" / ".half-written.array_record.tmp-999").write_bytes(b"partial")
    (resumed / ".slices-00000-of-00009.array_record.tmp-999").write_bytes(b"partial")
    # What a worker killed while writing a shard left before shards were written in place:
    (resumed / "..slices-00002-of-00020.array_record.tmp-998.tmp-999").write_bytes(b"partial")

    monkeypatch.setattr(local_runner, "process_cached", real)
    capsys.readouterr()
    assert prep.main(base + ["--out", str(resumed), "--keep-work"]) == 0
    assert "5 ok (2 reused from an earlier run)" in capsys.readouterr().out
    assert not [p for p in resumed.rglob(".*") if ".tmp-" in p.name]  # the next run cleared them

    clean_shards, resumed_shards = _shard_records(tmp_path / "clean"), _shard_records(resumed)
    assert len(clean_shards) == len(resumed_shards) > 1
    assert resumed_shards == clean_shards
    sizes = [len(s) for s in clean_shards]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 7
    assert [p.name for p in shards.list_shards(resumed, "slices")] == [
        p.name for p in shards.list_shards(tmp_path / "clean", "slices")]

    # Two workers write the shards in parallel, one task per shard: the same files, byte for byte.
    assert prep.main(["--root", f"ds={inputs}", "--workers", "2", "--shard-size", "7", *SMALL,
                      "--out", str(tmp_path / "parallel")]) == 0
    clean_files = shards.list_shards(tmp_path / "clean", "slices")
    parallel_files = shards.list_shards(tmp_path / "parallel", "slices")
    assert [p.read_bytes() for p in parallel_files] == [p.read_bytes() for p in clean_files]
    assert not list((tmp_path / "parallel").glob(".*tmp*"))


def test_subject_exclusion_and_changed_inputs(tmp_path, capsys):
    inputs = tmp_path / "in"
    paths = _write_good(inputs, 3)
    exclude = tmp_path / "eval_subjects.txt"
    exclude.write_text("# held-out evaluation subjects\nds/sub-01\n")
    argv = ["--root", f"ds={inputs}", "--out", str(tmp_path / "out"), "--workers", "1",
            "--exclude-subjects", str(exclude), "--keep-work", *SMALL]
    assert prep.main(argv) == 0
    rows = manifest.read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [r["status"] for r in rows] == [manifest.OK, manifest.EXCLUDED, manifest.OK]
    assert {r.subject for s in _shard_records(tmp_path / "out") for r in s} == {"sub-00", "sub-02"}

    # A volume whose bytes changed is prepared again; the others are reused.
    write_phantom(paths[2], 42, spacing=(4.0, 4.0, 4.0), skull_stripped=True)
    capsys.readouterr()
    assert prep.main(argv) == 0
    assert "(1 reused from an earlier run)" in capsys.readouterr().out
    want = Counter(records.encode(r) for r in _expected_records(paths[2], "ds", "sub-02", inputs))
    got = Counter(records.encode(r) for s in _shard_records(tmp_path / "out") for r in s if r.subject == "sub-02")
    assert got == want


def test_a_volume_whose_records_are_refused_fails_alone(tmp_path, monkeypatch):
    """A value SliceRecord refuses (here a non-finite std) fails that volume's row; nothing raises."""
    import dataclasses as dc

    from data_prep import volume_task

    path = _write_good(tmp_path, 1)[0]
    real = volume_task.preprocess_series

    def infinite_std(p, c):
        prepared, failures = real(p, c)
        return [dc.replace(v, fg_std=float("inf")) for v in prepared], failures

    monkeypatch.setattr(volume_task, "preprocess_series", infinite_std)
    result = prepare_volume(0, InputVolume(str(path), "ds", "sub-00", "", "T1w"), CONFIG)
    assert result.row["status"] == manifest.FAILED and result.records == []
    assert "SliceRecord.fg_std: must be finite" in result.row["reason"]


def test_a_blank_volume_of_a_4d_series_loses_only_itself(tmp_path, capsys):
    """four_d_policy=all: the good volumes of a series are kept, the blank one is named."""
    image = nib.load(_write_good(tmp_path / "src", 1)[0])
    volume = np.asanyarray(image.dataobj)
    series = np.stack([volume, np.zeros_like(volume), volume[::-1]], axis=-1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(series, image.affine), inputs / "sub-01_dwi.nii.gz")
    out = tmp_path / "out"
    code = prep.main(["--root", f"ds={inputs}", "--out", str(out), "--workers", "1",
                      "--four-d-policy", "all", *SMALL])
    assert code == 0
    text = capsys.readouterr().out
    assert "4D volumes skipped, the rest of their series kept (1):" in text
    assert "sub-01_dwi.nii.gz (volume 1): all voxels are zero (volume 1 of the 4D series)" in text
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["status"] == manifest.OK and row["volumes"] == 2
    assert row["volumes_failed"] == [
        {"volume_index": 1, "reason": "all voxels are zero (volume 1 of the 4D series)"}]
    written = [r for shard in _shard_records(out) for r in shard]
    assert sorted({r.volume_index for r in written}) == [0, 2]
    assert len(written) == row["slices_kept"]
