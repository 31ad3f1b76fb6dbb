"""Segmentation probe: decoder pieces against references, Dice, and training on frozen features."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.probes.encoders import load_encoder
from braindino_jax.probes.features import ExtractionSettings, VolumeJob, extract_features
from braindino_jax.probes.segmentation import (
    SegmentationDecoder,
    SegmentationSettings,
    SegmentationVolume,
    UpsampleBlock,
    class_indices,
    dice_scores,
    mean_dice,
    stack_blocks,
    train_decoder,
)


def test_upsample_block_is_a_stride_two_transposed_convolution():
    block = UpsampleBlock(6, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 6))
    kernel = block.linear.kernel[...].reshape(6, 2, 2, 5).transpose(1, 2, 0, 3)  # [dy, dx, in, out]
    # lax.conv_transpose correlates the dilated input, so its kernel is the spatial flip.
    reference = jax.lax.conv_transpose(x, kernel[::-1, ::-1], strides=(2, 2), padding="VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bias = jnp.tile(block.linear.bias[...].reshape(2, 2, 5), (3, 4, 1))  # one bias per block position
    np.testing.assert_allclose(np.asarray(block(x)), np.asarray(reference + bias), atol=1e-5)


def test_dice_per_class_on_a_volume():
    truth = np.zeros((2, 4, 4), np.int32)
    truth[0, :2] = 1  # 8 voxels of class 1
    pred = np.zeros_like(truth)
    pred[0, :1] = 1  # 4 of them found, nothing else
    pred[1, 0, 0] = 2  # one false class-2 voxel; class 3 absent from both
    dice = dice_scores(truth, pred, 4)
    np.testing.assert_allclose(dice[:2], [2 * 4 / (8 + 4), 0.0])
    assert np.isnan(dice[2])
    with pytest.raises(ValueError, match=r"mask.nii: label values \[9\] are not in config.task.label_values"):
        class_indices(np.array([0, 2, 9]), (0, 2, 4), "mask.nii")
    np.testing.assert_array_equal(class_indices(np.array([[0, 4], [2, 2]]), (0, 2, 4), "m"), [[0, 2], [1, 1]])


def test_decoder_trains_on_frozen_random_features_and_leaves_the_encoder_bit_identical(phantom_csv, tiny_arch):
    encoder = load_encoder(f"random:{tiny_arch}")
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(encoder.model)))
    with open(phantom_csv) as f:
        rows = list(csv.DictReader(f))[:6]
    folder = phantom_csv.parent
    jobs = [VolumeJob(str(folder / r["t1"]), str(folder / r["mask_path"])) for r in rows]
    prep = PrepConfig(target_spacing=(3.0, 3.0, 3.0), n_slices=8, size=64)
    extraction = extract_features(encoder, jobs, ExtractionSettings(prep, 64, layers=(0, 1), batch_size=16))
    volumes = [SegmentationVolume(stack_blocks(extraction.features[j], (0, 1)),
                                  class_indices(extraction.features[j]["labels"], (0, 1, 2, 3, 4), j.mask_path))
               for j in jobs]
    assert volumes[0].features.shape == (8, 4, 4, 128) and volumes[0].classes.shape == (8, 64, 64)
    settings = SegmentationSettings(steps=150, batch_size=8, learning_rate=1e-2, eval_every=50, patience=5)
    untrained, _ = train_decoder("linear", volumes[:4], volumes[4:], 5, SegmentationSettings(steps=1, eval_every=1))
    decoder, run = train_decoder("linear", volumes[:4], volumes[4:], 5, settings)
    assert run["train_loss"][-1] < run["train_loss"][0]
    trained_dice, untrained_dice = mean_dice(decoder, volumes[4:], 5), mean_dice(untrained, volumes[4:], 5)
    assert trained_dice > untrained_dice + 0.1
    conv = SegmentationDecoder("transposed_conv", 128, 5, grid=4, out_size=64, channels=16, rngs=nnx.Rngs(0))
    assert [up.out_channels for up in conv.ups] == [8, 8, 8, 8]  # 4 doublings: 4 -> 64 pixels
    assert conv(jnp.asarray(volumes[0].features[:2])).shape == (2, 64, 64, 5)
    conv_settings = SegmentationSettings(steps=40, batch_size=8, learning_rate=1e-2, eval_every=20, channels=16)
    conv, run = train_decoder("transposed_conv", volumes[:4], volumes[4:], 5, conv_settings)
    assert run["train_loss"][-1] < run["train_loss"][0] and 0 < mean_dice(conv, volumes[4:], 5) <= 1
    after = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(encoder.model)))
    jax.tree.map(np.testing.assert_array_equal, before, after)
