"""QC sampling: parallel shard tasks each sample their records, and the merged samples must pick
what one pass over all records picks."""

import json

import numpy as np
import pytest
from PIL import Image

from braindino_jax.data.qc_montage import QcSampler
from braindino_jax.data.records import SliceRecord


def _records(n: int) -> list[tuple[str, SliceRecord]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = np.where(rng.random((12, 12)) < rng.random(), rng.integers(1, 256, (12, 12)), 0).astype(np.uint8)
        out.append((f"vol{i // 5}/{i % 5}", SliceRecord(
            pixels=pixels, dataset=f"ds{i % 2}", subject=f"sub-{i // 5}", session="", modality="T1w",
            source_path=f"/x/{i // 5}.nii.gz", slice_index=i % 5, n_slices=5, spacing=(1.0, 1.0, 1.0),
            fg_mean=100.0, fg_std=20.0)))
    return out


def _selection_keys(sampler: QcSampler) -> dict[str, list[str]]:
    return {name: [key for key, _, _ in tiles] for name, tiles in sampler.selections().items()}


@pytest.mark.parametrize("per_dataset,worst", [(3, 4), (0, 4)])
def test_merged_partial_samples_equal_one_pass(tmp_path, per_dataset, worst):
    items = _records(40)
    whole = QcSampler(per_dataset, worst, seed=1)
    for key, record in items:
        whole.observe(key, record)
    parts = [QcSampler(per_dataset, worst, seed=1) for _ in range(3)]
    for i, (key, record) in enumerate(items):  # dealt round-robin, as records are over shards
        parts[i % 3].observe(key, record)
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert _selection_keys(merged) == _selection_keys(whole)

    written = merged.write(tmp_path)
    expected = ({"sample_ds0.png", "sample_ds1.png"} if per_dataset else set()) | {"worst_foreground.png"}
    assert {p.name for p in written} == expected
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["worst_foreground.png"]) == worst
    fractions = sorted(np.count_nonzero(r.pixels) / r.pixels.size for _, r in items)
    worst_keys = set(index["worst_foreground.png"][i]["key"] for i in range(worst))
    by_key = dict(items)
    assert sorted(np.count_nonzero(by_key[k].pixels) / 144 for k in worst_keys) == fractions[:worst]
    assert Image.open(tmp_path / "worst_foreground.png").size[0] > 0
