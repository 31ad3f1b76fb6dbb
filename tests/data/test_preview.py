"""Augmentation preview: grid geometry, mask overlay, and the braindino-preview CLI."""

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from braindino_jax.cli.preview import main
from braindino_jax.data import records
from braindino_jax.data.preview import add_legend, grid_size, render_grid


def test_grid_layout_window_and_mask_overlay():
    globals_ = np.zeros((2, 2, 16, 16, 3), np.float32)
    globals_[1, 0] = 2.5  # white through the default window
    locals_ = np.full((2, 3, 8, 8, 3), -2.5, np.float32)  # black
    masks = np.zeros((2, 2, 16), bool)
    masks[0, 1, 0] = True  # top-left 4x4 patch of sample 0, global crop 2
    image = render_grid(globals_, locals_, masks, pad=2)
    assert image.size == grid_size(2, 3, 16, 8, pad=2) == (2 + 2 * 18 + 3 * 10, 2 + 2 * 18)
    rgb = np.asarray(image).astype(int)
    assert (rgb[2, 2] == [128, 128, 128]).all()          # z = 0 -> mid-grey
    assert (rgb[20, 2] == [255, 255, 255]).all()          # sample 1, global crop 1
    assert (rgb[2, 2 + 2 * 18] == [0, 0, 0]).all()        # sample 0, first local crop
    tinted, plain = rgb[3, 20 + 1], rgb[3, 20 + 5]        # masked vs unmasked patch of crop 2
    assert tinted[0] > tinted[1] == tinted[2] and (plain == 128).all()


def test_legend_titles_the_columns_and_keeps_the_grid_intact():
    rng = np.random.default_rng(0)
    grid = render_grid(rng.uniform(-2, 2, (2, 2, 64, 64)), rng.uniform(-2, 2, (2, 3, 32, 32)),
                       rng.random((2, 2, 16)) < 0.3)
    out = np.asarray(add_legend(grid, n_local=3, global_size=64, local_size=32, patch_size=16))
    g = np.asarray(grid)
    assert out.shape[1] == g.shape[1]
    offsets = [y for y in range(out.shape[0] - g.shape[0] + 1) if (out[y:y + g.shape[0]] == g).all()]
    assert len(offsets) == 1 and 0 < offsets[0] < out.shape[0] - g.shape[0]
    top, bottom = out[:offsets[0]], out[offsets[0] + g.shape[0]:]
    assert (top < 100).any() and (bottom < 100).any()  # dark titles above, dark key text below
    # Titles stay inside their columns: nothing dark in the padding between the two globals.
    assert (top[:, 4 + 64:4 + 64 + 4] > 200).all()


def test_cli_writes_the_png_grid(tmp_path, capsys):
    # An empty shard sorts first: the preview must look past it, as the pipeline does.
    ArrayRecordWriter(str(tmp_path / "p-00000-of-00002.array_record"), "group_size:1,zstd").close()
    writer = ArrayRecordWriter(str(tmp_path / "p-00001-of-00002.array_record"), "group_size:1,zstd")
    yy, xx = np.mgrid[:48, :48]
    brain = ((yy - 24) ** 2 + (xx - 24) ** 2 < 18 ** 2)
    for i in range(6):
        pixels = np.where(brain, 60 + 3 * i + (xx % 7) * 10, 0).astype(np.uint8)
        writer.write(records.encode(records.SliceRecord(
            pixels=pixels, dataset="d", subject=f"s{i}", session="", modality="T1w",
            source_path="x.nii.gz", slice_index=i, n_slices=6, spacing=(1.0, 1.0, 1.0),
            fg_mean=float(pixels[brain].mean()), fg_std=float(pixels[brain].std()))))
    writer.close()
    out = tmp_path / "grid.png"
    argv = [str(tmp_path / "p-*.array_record"), "--out", str(out), "--samples", "3",
            "--global-size", "32", "--local-size", "16", "--n-local", "2", "--patch-size", "8"]
    assert main(argv) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB"
    width, height = grid_size(3, 2, 32, 16)
    assert image.size[0] == width and image.size[1] > height + 32  # the legend's titles and key
    assert len(np.unique(np.asarray(image))) > 10  # real crops, not a blank canvas

    assert main([str(tmp_path / "nothing-*"), "--out", str(out)]) == 2
    assert "no shard files match" in capsys.readouterr().err
    junk = tmp_path / "junk.array_record"
    junk.write_bytes(b"not an array_record file")
    assert main([str(junk), "--out", str(out)]) == 2  # an error message, not a traceback
    assert f"cannot open shard {junk}" in capsys.readouterr().err
