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



def test_tiles_are_large_and_labels_stay_inside_their_tile(tmp_path):
    """A top slice (a 40-pixel brain in a 256-pixel frame) is shown enlarged, and a label
    longer than its tile is wrapped or cut: the neighbouring tile looks the same either way."""
    from braindino_jax.data.qc_montage import _montage_png

    rng = np.random.default_rng(3)
    pixels = np.zeros((256, 256), np.uint8)
    pixels[100:140, 110:150] = rng.integers(1, 256, (40, 40))
    long_label = "a-dataset-with-a-long-name/sub-" + "9" * 60 + " ses-baseline FLAIR z3 fg2%"

    def montage(first_label):
        tiles = [("k0", first_label, pixels), ("k1", "b", pixels), ("k2", "c", pixels)]
        path = tmp_path / "montage.png"
        path.write_bytes(_montage_png(tiles))
        return np.asarray(Image.open(path))

    short, long = montage("a"), montage(long_label)
    cell = short.shape[1] // 3
    np.testing.assert_array_equal(long[:, cell:], short[:, cell:])
    assert not np.array_equal(long[:, :cell], short[:, :cell])  # the label is drawn, in its own tile
    brain_rows = np.count_nonzero(np.count_nonzero(short[:, :cell], axis=1) >= 100)
    assert brain_rows >= 150  # 40 pixels shown at least ~4x


def test_labels_are_wrapped_to_the_tile_width_and_cut_only_when_too_long():
    from PIL import ImageDraw, ImageFont

    from braindino_jax.data.qc_montage import CAPTION_LINES, FONT_SIZE, _fit_label

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    font = ImageFont.load_default(size=FONT_SIZE)
    width = 250
    two_lines = "demo-a/sub-0123456789 ses-baseline T1w z150 fg3% and a second line's worth"
    lines = _fit_label(draw, two_lines, font, width)
    assert len(lines) == 2 and " ".join(lines) == two_lines
    too_long = "x" * 400
    lines = _fit_label(draw, too_long, font, width)
    assert len(lines) == CAPTION_LINES and lines[-1].endswith("…")
    for line in lines + _fit_label(draw, two_lines, font, width):
        assert draw.textlength(line, font=font) <= width
