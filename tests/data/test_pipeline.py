"""Grain input pipeline: determinism, per-process sharding, mixing, device placement, resume."""

import json
import os
import re
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from braindino_jax.data import masking, records
from braindino_jax.data.pipeline import (
    PipelineConfig,
    PipelineError,
    device_iterator,
    host_dataset,
    mask_token_bound,
)

SIZE = 16


def _record(record_id: int) -> records.SliceRecord:
    """A slice whose pixels and fg_mean both encode its id (fg_mean = id + 1)."""
    pixels = np.random.default_rng(record_id).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    return records.SliceRecord(
        pixels=pixels, dataset="synthetic", subject=f"sub-{record_id}", session="", modality="T1w",
        source_path=f"/data/{record_id}.nii.gz", slice_index=0, n_slices=1,
        spacing=(1.0, 1.0, 1.0), fg_mean=float(record_id + 1), fg_std=10.0,
    )


def _write_shard(path, payloads) -> None:
    writer = ArrayRecordWriter(str(path), "group_size:1,zstd")
    for payload in payloads:
        writer.write(payload)
    writer.close()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for shard, ids in enumerate((range(0, 24), range(24, 48))):
        _write_shard(root / f"a-{shard:05d}-of-00002.array_record", (records.encode(_record(i)) for i in ids))
    _write_shard(root / "b-00000-of-00001.array_record",
                 (records.encode(_record(i)) for i in range(1000, 1032)))
    return root


def _config(shard_dir, **overrides) -> PipelineConfig:
    settings = dict(shards=(str(shard_dir / "a-*.array_record"),), batch_size=8, image_size=SIZE,
                    seed=3, mask_grid=(8, 8))
    settings.update(overrides)
    return PipelineConfig(**settings)


def _ids(batch) -> list[int]:
    return [int(m) - 1 for m in np.asarray(batch["fg_mean"])]


def _take(iterator, n):
    return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def test_batches_are_decoded_and_deterministic_given_the_seed(shard_dir):
    first = _take(iter(host_dataset(_config(shard_dir), 0, 1)), 3)
    again = _take(iter(host_dataset(_config(shard_dir), 0, 1)), 3)
    other = _take(iter(host_dataset(_config(shard_dir, seed=4), 0, 1)), 3)
    for a, b in zip(first, again):
        assert a.keys() == b.keys() == {"pixels", "fg_mean", "fg_std", "masks"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert [_ids(b) for b in first] != [_ids(b) for b in other]

    batch = first[0]
    assert batch["pixels"].dtype == np.uint8 and batch["pixels"].shape == (8, SIZE, SIZE)
    assert batch["fg_mean"].dtype == np.float32 and batch["fg_std"].dtype == np.float32
    for record_id, pixels in zip(_ids(batch), batch["pixels"]):
        np.testing.assert_array_equal(pixels, _record(record_id).pixels)
    masks = batch["masks"]
    assert masks.dtype == bool and masks.shape == (8, 2, 64)
    # Half of the 16 global crops are masked, each with at most half of its 64 patches.
    per_crop = masks.reshape(16, 64).sum(axis=1)
    assert (per_crop > 0).sum() == 8 and per_crop.max() <= 32


def test_processes_read_disjoint_parts_that_cover_every_epoch(shard_dir):
    per_process, masked = [], np.zeros(12, int)
    for index in range(2):
        batches = _take(iter(host_dataset(_config(shard_dir), index, 2)), 12)  # 2 epochs
        assert all(b["pixels"].shape[0] == 4 for b in batches)
        per_process.append([i for b in batches for i in _ids(b)])
        masked += [int(b["masks"].sum()) for b in batches]
    # Masks are stratified per process; every global step masks exactly the bound.
    bound = mask_token_bound(_config(shard_dir), process_count=2)
    assert bound == 2 * masking.max_masked_tokens(8, (8, 8))
    assert (masked == bound).all()
    epoch = lambda ids, e: ids[24 * e: 24 * (e + 1)]
    for e in range(2):
        p0, p1 = epoch(per_process[0], e), epoch(per_process[1], e)
        assert not set(p0) & set(p1)
        assert sorted(p0 + p1) == list(range(48))
    # Each epoch is shuffled differently.
    assert epoch(per_process[0], 0) != epoch(per_process[0], 1)


def test_processes_draw_their_own_masks_and_resume_exactly(shard_dir):
    """Grain seeds per-batch generators by batch index, which every process counts from 0: the
    mask seed must also depend on the process, or a P-process run repeats its masks P times."""
    config = _config(shard_dir, batch_size=16)
    per_process = [_take(iter(host_dataset(config, index, 2)), 4) for index in range(2)]
    for a, b in zip(*per_process):
        assert a["masks"].sum() == b["masks"].sum() == masking.max_masked_tokens(16, (8, 8))
        assert not np.array_equal(a["masks"], b["masks"])
    # One process's stream is still a pure function of (seed, process): a restored iterator
    # continues with the very batches, masks included.
    it = iter(host_dataset(config, 1, 2))
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = iter(host_dataset(config, 1, 2))
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 2)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(expected, per_process[1][2:]):
        np.testing.assert_array_equal(a["masks"], b["masks"])


def test_weighted_mixture_of_datasets(shard_dir):
    config = _config(shard_dir, shards=(str(shard_dir / "a-*"), str(shard_dir / "b-*")),
                     weights=(3.0, 1.0), batch_size=16, mask_grid=None)
    ids = [i for b in _take(iter(host_dataset(config, 0, 1)), 8) for i in _ids(b)]
    from_b = [i for i in ids if i >= 1000]
    assert abs(len(from_b) / len(ids) - 0.25) < 0.05
    assert len(set(from_b)) == len(from_b)  # no repeats before b's epoch (32) ends


_RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import grain, jax, numpy as np, orbax.checkpoint as ocp
    from braindino_jax.data.pipeline import PipelineConfig, device_iterator
    config_kwargs, ckpt_dir, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    config = PipelineConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in config_kwargs.items()})
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    it = device_iterator(config, mesh)
    ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).restore(
        ckpt_dir, args=grain.checkpoint.CheckpointRestore(it))
    batches = [next(it) for _ in range(3)]
    np.savez(out_path, **{f"{k}_{i}": np.asarray(b[k]) for i, b in enumerate(batches) for k in b})
    it.close()
""")


def test_device_batches_are_sharded_and_resume_exactly_in_a_new_process(shard_dir, tmp_path):
    config_kwargs = dict(shards=[str(shard_dir / "a-*.array_record")], batch_size=8,
                         image_size=SIZE, seed=5, mask_grid=[4, 4], num_workers=2)
    config = PipelineConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in config_kwargs.items()})
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    it = device_iterator(config, mesh)
    try:
        first = next(it)
        for value in first.values():
            assert value.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
            assert len(value.addressable_shards) == 8 and value.shape[0] == 8
        next(it)  # k = 2 batches consumed; the iterator has prefetched further
        ckpt_dir = tmp_path / "data_iter"
        ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).save(
            ckpt_dir, args=grain.checkpoint.CheckpointSave(it))
        expected = _take(it, 3)
    finally:
        it.close()
    assert json.loads((ckpt_dir / "process_0-of-1.json").read_text())

    # Worker processes and the in-process path produce the same stream.
    in_process = _take(iter(host_dataset(PipelineConfig(**{**config.__dict__, "num_workers": 0}),
                                         0, 1)), 5)[2:]
    for a, b in zip(expected, in_process):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    out = tmp_path / "resumed.npz"
    subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, json.dumps(config_kwargs),
                    str(ckpt_dir), str(out)], check=True, env=os.environ.copy(), timeout=300)
    resumed = np.load(out)
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{key}_{i}"], value)


def test_bad_inputs_name_the_file_or_field(shard_dir, tmp_path):
    with pytest.raises(PipelineError, match="no shard files match"):
        host_dataset(_config(shard_dir, shards=(str(tmp_path / "missing-*"),)), 0, 1)
    with pytest.raises(PipelineError, match="PipelineConfig.batch_size"):
        host_dataset(_config(shard_dir, batch_size=6), 0, 4)
    with pytest.raises(PipelineError, match="PipelineConfig.weights"):
        host_dataset(_config(shard_dir, weights=(1.0, 2.0)), 0, 1)

    corrupt = tmp_path / "corrupt-00000-of-00001.array_record"
    _write_shard(corrupt, [records.encode(_record(0)), b"\x93not a record"])
    config = _config(shard_dir, shards=(str(corrupt),), batch_size=2, mask_grid=None)
    with pytest.raises(PipelineError, match=r"corrupt-00000-of-00001.array_record \(record 1\)"):
        next(iter(host_dataset(config, 0, 1)))

    wrong = tmp_path / "wrong-00000-of-00001.array_record"
    _write_shard(wrong, [records.encode(_record(0))] * 2)
    config = _config(shard_dir, shards=(str(wrong),), batch_size=2, image_size=32, mask_grid=None)
    with pytest.raises(PipelineError, match=r"wrong-00000.*16x16.*32x32 \(image_size\)"):
        next(iter(host_dataset(config, 0, 1)))

    # A shard damaged after writing (bit rot, a bad copy): array_record's own error names
    # neither the file nor the record; the pipeline's must, on the batched read path.
    damaged = tmp_path / "damaged-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(damaged), "group_size:1,uncompressed")
    for i in range(24):
        writer.write(records.encode(_record(i)))
    writer.close()
    data = bytearray(damaged.read_bytes())
    data[data.find(_record(5).pixels.tobytes()) + 7] ^= 0xFF  # one bit-flipped byte in record 5
    damaged.write_bytes(bytes(data))
    config = _config(shard_dir, shards=(str(damaged),), batch_size=24, mask_grid=None)
    with pytest.raises(PipelineError, match=r"damaged-00000-of-00001.array_record \(record 5\)"):
        next(iter(host_dataset(config, 0, 1)))

    junk = tmp_path / "junk-00000-of-00001.array_record"
    junk.write_bytes(b"not an array_record file")
    config = _config(shard_dir, shards=(str(shard_dir / "a-*"), str(junk)), mask_grid=None)
    with pytest.raises(PipelineError, match=f"cannot open shard {re.escape(str(junk))}:"):
        host_dataset(config, 0, 1)


def test_masks_stratified_per_group_stay_within_each_groups_bound(shard_dir):
    """With mask_groups=G, each group of b/G samples (one device's share) is stratified alone,
    so every group's masked count respects the per-group bound the train step's gather uses."""
    from braindino_jax.data.pipeline import mask_group_bound

    config = _config(shard_dir, mask_groups=4, mask_sample_probability=0.5)
    bound = mask_group_bound(config, process_count=1)
    assert bound == masking.max_masked_tokens(4, (8, 8))
    assert mask_token_bound(config, process_count=1) == 4 * bound
    for batch in _take(iter(host_dataset(config, 0, 1)), 12):
        groups = batch["masks"].reshape(4, 2 * 2, 64)  # 4 groups of 2 samples x 2 crops
        assert (groups.sum(axis=(1, 2)) == bound).all()  # DINOv3 counts: exactly the bound
        # DINOv3's per-GPU rule: int(2b * p) masked crops in every group.
        assert (groups.any(axis=2).sum(axis=1) == 2).all()
    with pytest.raises(PipelineError, match="mask_groups"):
        _config(shard_dir, mask_groups=3).validate(1)
