"""Slice records and ArrayRecord shards: exact round trips, clear errors, balanced shards."""

import dataclasses

import grain
import msgpack
import numpy as np
import pytest

from braindino_jax.data import records, shards


def _record(rng: np.random.Generator, **overrides) -> records.SliceRecord:
    fields = dict(
        pixels=rng.integers(0, 256, size=(17, 23), dtype=np.uint8),
        dataset="ds-α",  # non-ASCII survives
        subject="sub-07",
        session="ses-2",
        modality="FLAIR",
        source_path="ds/sub-07/ses-2/anat/sub-07_ses-2_FLAIR.nii.gz",
        slice_index=41,
        n_slices=180,
        spacing=(0.9375, 0.9375, 1.2000000000000002),
        fg_mean=101.28374619283,
        fg_std=37.000000000000014,
        volume_index=3,
    )
    fields.update(overrides)
    return records.SliceRecord(**fields)


def test_encode_decode_is_exact():
    rng = np.random.default_rng(0)
    record = _record(rng)
    decoded = records.decode(records.encode(record))
    assert decoded == record
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (17, 23)
    assert decoded.fg_mean == 101.28374619283 and decoded.spacing[2] == 1.2000000000000002
    assert decoded.pixels.flags.writeable  # a private copy, not a view of the bytes


def test_equality_sees_every_field():
    rng = np.random.default_rng(1)
    record = _record(rng)
    changed_pixels = record.pixels.copy()
    changed_pixels[3, 4] ^= 1
    assert record != dataclasses.replace(record, pixels=changed_pixels)
    assert record != dataclasses.replace(record, pixels=record.pixels[:, :-1].copy())
    for name, value in [("subject", "sub-08"), ("slice_index", 42), ("fg_std", 37.0), ("volume_index", 0),
                        ("spacing", (0.9375, 0.9375, 1.2))]:
        assert record != dataclasses.replace(record, **{name: value}), name


def test_bad_records_are_refused_with_the_field_named():
    rng = np.random.default_rng(2)
    with pytest.raises(records.RecordError, match="pixels"):
        _record(rng, pixels=np.zeros((4, 4), np.float32))
    with pytest.raises(records.RecordError, match="pixels"):
        _record(rng, pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(records.RecordError, match="fg_std"):
        _record(rng, fg_std=float("nan"))
    with pytest.raises(records.RecordError, match="spacing"):
        _record(rng, spacing=(1.0, 1.0))
    with pytest.raises(records.RecordError, match="slice_index"):
        _record(rng, slice_index=180)
    with pytest.raises(records.RecordError, match="subject"):
        _record(rng, subject=7)


def test_decode_rejects_bad_bytes_and_unknown_schema():
    rng = np.random.default_rng(3)
    data = records.encode(_record(rng))
    with pytest.raises(records.RecordError, match="msgpack"):
        records.decode(b"\xc1 not msgpack")
    with pytest.raises(records.RecordError):
        records.decode(data[: len(data) // 2])
    payload = msgpack.unpackb(data, raw=False)
    payload["schema_version"] = 99
    with pytest.raises(records.RecordError, match="schema_version 99"):
        records.decode(msgpack.packb(payload, use_bin_type=True))
    payload["schema_version"] = 1  # absolute source paths: shards made before schema 2 are refused
    with pytest.raises(records.RecordError, match="schema_version 1 is not supported.*prepare the shards again"):
        records.decode(msgpack.packb(payload, use_bin_type=True))
    payload["schema_version"] = records.SCHEMA_VERSION
    payload["height"] += 1
    with pytest.raises(records.RecordError, match="shape"):
        records.decode(msgpack.packb(payload, use_bin_type=True))
    del payload["modality"]
    with pytest.raises(records.RecordError, match="modality"):
        records.decode(msgpack.packb(payload, use_bin_type=True))


def test_shards_round_trip_through_grain(tmp_path):
    """Write volumes' records into balanced shards; Grain reads back exactly the same records."""
    rng = np.random.default_rng(4)
    volume_counts = [7, 3, 12, 1, 9]
    volumes = [
        [_record(rng, subject=f"sub-{v}", slice_index=j, n_slices=count) for j in range(count)]
        for v, count in enumerate(volume_counts)
    ]
    total = sum(volume_counts)
    n_shards = shards.count_shards(total, 0, target_records=8)
    assert n_shards == 4
    offsets = shards.record_offsets(volume_counts)
    expected = [[] for _ in range(n_shards)]
    for offset, volume in zip(offsets, volumes):
        for j, record in enumerate(volume):
            expected[shards.shard_of(offset, j, n_shards)].append(record)
    with shards.ShardSet(tmp_path, "train", n_shards) as shard_set:
        for s, temp in enumerate(shard_set.temps):  # each shard on its own, as parallel writers do
            members = shards.shard_members(s, n_shards, volume_counts)
            shards.write_array_record(temp, (records.encode(volumes[v][j]) for v, js in members for j in js))
        paths = shard_set.commit()
    assert [p.name for p in paths] == [f"train-{i:05d}-of-00004.array_record" for i in range(4)]
    assert shards.list_shards(tmp_path, "train") == paths
    assert not list(tmp_path.glob(".*tmp*"))

    sizes = [len(s) for s in expected]
    assert max(sizes) - min(sizes) <= 1
    # The 12-slice volume lands in every shard, 3 slices each.
    assert [sum(r.subject == "sub-2" for r in s) for s in expected] == [3, 3, 3, 3]

    for path, want in zip(paths, expected):
        source = grain.sources.ArrayRecordDataSource([str(path)])
        assert len(source) == len(want)
        got = [records.decode(source[i]) for i in range(len(source))]
        assert got == want
    whole = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    assert len(whole) == total


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    rng = np.random.default_rng(5)
    data = records.encode(_record(rng))
    for n in (3, 2):
        with shards.ShardSet(tmp_path, "train", n) as shard_set:
            for temp in shard_set.temps:
                shards.write_array_record(temp, [data])
            shard_set.commit()
    assert [p.name for p in shards.list_shards(tmp_path, "train")] == [
        "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]


def test_interrupted_shard_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(6)
    with pytest.raises(KeyboardInterrupt):
        with shards.ShardSet(tmp_path, "train", 2) as shard_set:
            shards.write_array_record(shard_set.temps[0], [records.encode(_record(rng))])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(shards.ShardError, match="no shards"):
        shards.list_shards(tmp_path, "train")


def test_partial_shard_set_is_reported(tmp_path):
    (tmp_path / "train-00000-of-00003.array_record").write_bytes(b"")
    (tmp_path / "train-00002-of-00003.array_record").write_bytes(b"")
    with pytest.raises(shards.ShardError, match="inconsistent"):
        shards.list_shards(tmp_path, "train")


def test_shard_count_targets():
    assert shards.count_shards(100, 10_000, target_records=30) == 4
    assert shards.count_shards(100, 10_000, target_bytes=2_500) == 4
    assert shards.count_shards(3, 10**12, target_bytes=1) == 3  # never an empty shard
    assert shards.count_shards(0, 0, target_records=5) == 1
    with pytest.raises(ValueError, match="exactly one"):
        shards.count_shards(1, 1)


def test_read_by_index_and_out_of_range_names_the_index(tmp_path):
    path = tmp_path / "work.array_record"
    shards.write_array_record(path, [b"r0", b"r1", b"r2"], shards.WORK_OPTIONS)
    assert shards.read_array_record(path) == [b"r0", b"r1", b"r2"]
    assert shards.read_array_record(path, np.array([2, 0]), expect=3) == [b"r2", b"r0"]
    with pytest.raises(shards.ShardError, match="holds 3 records, expected 4"):
        shards.read_array_record(path, [0], expect=4)
    with pytest.raises(shards.ShardError, match="asked for index -1"):
        shards.read_array_record(path, [1, -1])
    with pytest.raises(shards.ShardError, match="asked for index 3"):
        shards.read_array_record(path, [3, 0])
