"""On-device multi-crop augmentation: shapes, crop geometry, resampling, blur, intensities."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
from PIL import Image

from braindino_jax.data.augment import AugmentConfig, augment_batch, sample_crop_box
from braindino_jax.preprocessing.config import PrepConfig
from braindino_jax.preprocessing.phantom import write_phantom
from braindino_jax.preprocessing.volume import preprocess_volume

SMALL = AugmentConfig(global_size=32, local_size=16, n_local=3)
# Identity geometry: full-image crops, no flips, no intensity change except a fixed blur and
# solarisation on global crop 1, so global crop 2 and the locals have closed-form references.
IDENTITY = AugmentConfig(
    global_size=40, local_size=24, n_local=1,
    global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0),
    flip_prob=0.0, bias_field_prob=0.0, brightness_contrast_prob=0.0, gamma_prob=0.0,
    noise_prob=0.0, blur_probs=(1.0, 0.0, 0.0), blur_sigma=(1.5, 1.5),
    solarize_probs=(1.0, 0.0, 0.0),
)


@functools.lru_cache(maxsize=None)
def _jitted(config: AugmentConfig):
    return jax.jit(functools.partial(augment_batch, config=config))


def _brain_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A float 'brain' (ellipse of smooth texture) and its foreground mask."""
    yy, xx = np.mgrid[:size, :size]
    fg = ((yy - size / 2) / (0.4 * size)) ** 2 + ((xx - size / 2) / (0.33 * size)) ** 2 < 1
    tissue = scipy.ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0) * 40 + 300
    return np.where(fg, tissue, 0.0), fg


def _to_storage(x: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The contract's intensity mapping: clip to fg percentiles, fg -> [1, 255], bg -> 0."""
    lo, hi = np.percentile(x[fg], [0.5, 99.5])
    clipped = np.clip(x, lo, hi)
    units = 1 + 254 * (clipped - lo) / (hi - lo)
    u = np.where(fg, np.round(units), 0).astype(np.uint8)
    return u, float(units[fg].mean()), float(units[fg].std())


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    x, fg = _brain_slice(rng, 40)
    u, mean, std = _to_storage(x, fg)
    return x, fg, u, mean, std


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_dtypes_ranges_and_per_sample_keys(slices, batch):
    _, _, u, mean, std = slices
    pixels = jnp.asarray(np.repeat(u[None], batch, axis=0))
    out = _jitted(SMALL)(jax.random.key(7), pixels, jnp.full(batch, mean), jnp.full(batch, std))
    assert out["global"].shape == (batch, 2, 32, 32, 3)
    assert out["local"].shape == (batch, 3, 16, 16, 3)
    for views in out.values():
        views = np.asarray(views)
        assert views.dtype == np.float32 and np.isfinite(views).all()
        np.testing.assert_array_equal(views[..., 0], views[..., 2])
        # Before z-scoring, intensities stay within a few times [0, 1]: the bias field and the
        # contrast jitter may exceed 1 (no clip), solarisation maps r > 1 below 0, noise <= 0.25.
        assert views.min() >= (-2.0 * 255 - mean) / std
        assert views.max() <= (3.0 * 255 - mean) / std
        assert (views == 0).any() and (np.abs(views) > 0.5).any()
    if batch == 3:
        # Identical inputs, per-sample keys: every sample's crops differ.
        g = np.asarray(out["global"])
        assert not np.allclose(g[0], g[1]) and not np.allclose(g[1], g[2])
        # Sample i's key is fold_in(key, i): independent of the batch size.
        single = _jitted(SMALL)(jax.random.key(7), pixels[:1], jnp.full(1, mean), jnp.full(1, std))
        np.testing.assert_allclose(np.asarray(single["global"][0]), g[0], atol=1e-5)


def test_sharded_batch_matches_unsharded_samples(slices):
    _, _, u, mean, std = slices
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    put = lambda x: jax.device_put(x, sharding)
    pixels = put(jnp.asarray(np.repeat(u[None], 8, axis=0)))
    out = _jitted(SMALL)(jax.random.key(7), pixels, put(jnp.full(8, mean)), put(jnp.full(8, std)))
    assert len(out["global"].sharding.device_set) == 8
    single = _jitted(SMALL)(jax.random.key(7), jnp.asarray(u[None]), jnp.full(1, mean),
                            jnp.full(1, std))
    for name in ("global", "local"):
        np.testing.assert_allclose(np.asarray(out[name])[0], np.asarray(single[name])[0], atol=1e-5)


def test_single_channel_bfloat16(slices):
    _, _, u, mean, std = slices
    config = AugmentConfig(global_size=32, local_size=16, n_local=2, channels=1, dtype="bfloat16")
    out = _jitted(config)(jax.random.key(1), jnp.asarray(np.stack([u, u])),
                          jnp.full(2, mean), jnp.full(2, std))
    assert out["global"].shape == (2, 2, 32, 32, 1) and out["global"].dtype == jnp.bfloat16
    assert out["local"].shape == (2, 2, 16, 16, 1) and out["local"].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def identity_out(slices):
    _, _, u, mean, std = slices
    out = _jitted(IDENTITY)(jax.random.key(3), jnp.asarray(u[None]), jnp.full(1, mean),
                            jnp.full(1, std))
    return {k: np.asarray(v[0, ..., 0], np.float64) for k, v in out.items()}


def test_identity_crop_reproduces_float_zscore(slices, identity_out):
    x, fg, _, mean, std = slices
    lo, hi = np.percentile(x[fg], [0.5, 99.5])
    clipped = np.clip(x[fg], lo, hi)
    expected = (clipped - clipped.mean()) / clipped.std()
    got = identity_out["global"][1]
    # Rounding to uint8 moves a value by at most half a unit: 0.5 / fg_std in z units.
    assert np.abs(got[fg] - expected).max() <= 0.5 / std + 1e-5
    np.testing.assert_array_equal(got[~fg], 0.0)


@pytest.mark.parametrize("interpolation,pil_filter", [("bicubic", Image.BICUBIC),
                                                      ("bilinear", Image.BILINEAR)])
def test_resized_crop_matches_pil(slices, identity_out, interpolation, pil_filter):
    """DINOv3 resizes PIL images bicubically (antialiased); the default must agree with PIL."""
    _, fg, u, mean, std = slices
    size = IDENTITY.local_size
    if interpolation == IDENTITY.interpolation:
        got = identity_out["local"][0]
    else:
        config = dataclasses.replace(IDENTITY, interpolation=interpolation)
        out = _jitted(config)(jax.random.key(3), jnp.asarray(u[None]), jnp.full(1, mean),
                              jnp.full(1, std))
        got = np.asarray(out["local"][0, 0, ..., 0], np.float64)

    def pil_resize(a):
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(
            (size, size), pil_filter), np.float64)

    r = pil_resize(u / 255.0)
    mask = pil_resize(fg.astype(np.float64))
    # Normalised resampling: intensities divided by the resampled mask on the foreground.
    expected = np.where(mask >= 0.5, (255 * np.maximum(r / np.maximum(mask, 0.5), 0) - mean) / std,
                        0.0)
    clear = np.abs(mask - 0.5) > 1e-3  # pixels whose fg/bg decision is not a rounding tie
    np.testing.assert_allclose(got[clear], expected[clear], atol=1e-4)


def test_foreground_blur_then_solarisation_on_global_crop_1(slices, identity_out):
    _, fg, _, mean, std = slices
    sharp = identity_out["global"][1]
    r = np.where(fg, (sharp * std + mean) / 255.0, 0.0)
    radius = IDENTITY.blur_kernel_size // 2  # DINOv3's 9-tap kernel
    blur = lambda a: scipy.ndimage.gaussian_filter(a, 1.5, mode="mirror", truncate=radius / 1.5)
    blurred = blur(r * fg) / np.maximum(blur(fg.astype(np.float64)), 1e-6)  # foreground only
    solarized = np.where(blurred >= 128 / 255, 1 - blurred, blurred)  # torchvision's rule
    expected = np.where(fg, (255 * solarized - mean) / std, 0.0)
    clear = np.abs(blurred - 128 / 255) > 1e-4  # not a rounding tie at the threshold
    assert (solarized != blurred)[fg].mean() > 0.2  # the bright half really was inverted
    np.testing.assert_allclose(identity_out["global"][0][clear], expected[clear], atol=1e-4)


def _reference_areas(rng, n, height, width, scale, ratio):
    """float64 rejection sampler: area ~ U(scale), log-ratio uniform, keep the first fit."""
    out = []
    while len(out) < n:
        s = rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(s * height * width * r), math.sqrt(s * height * width / r)
        if w <= width and h <= height:
            out.append(s)
    return np.array(out)


def test_crop_box_areas_follow_the_configured_distribution():
    n, height, width = 4000, 256, 256
    keys = jax.random.split(jax.random.key(0), n)

    @functools.partial(jax.jit, static_argnums=(1,))
    def boxes(keys, scale):
        return jax.vmap(lambda k: sample_crop_box(k, height, width, scale, (3 / 4, 4 / 3)))(keys)

    local = np.asarray(boxes(keys, (0.05, 0.32)), np.float64)
    top, left, h, w = local.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height + 1e-3).all() and (left + w <= width + 1e-3).all()
    area = h * w / (height * width)
    assert scipy.stats.kstest(area, scipy.stats.uniform(0.05, 0.27).cdf).pvalue > 1e-3
    log_ratio = np.log(w / h)
    lr = math.log(4 / 3)
    assert scipy.stats.kstest(log_ratio, scipy.stats.uniform(-lr, 2 * lr).cdf).pvalue > 1e-3

    # Global crops can fail to fit (area near 1 with a non-square ratio) and are redrawn.
    glob = np.asarray(boxes(keys, (0.32, 1.0)), np.float64)
    area = glob[:, 2] * glob[:, 3] / (height * width)
    reference = _reference_areas(np.random.default_rng(1), 20000, height, width, (0.32, 1.0),
                                 (3 / 4, 4 / 3))
    assert scipy.stats.ks_2samp(area, reference).pvalue > 1e-3
    assert not scipy.stats.ks_2samp(area, np.random.default_rng(2).uniform(0.32, 1.0, 20000)
                                    ).pvalue > 1e-3


@pytest.fixture(scope="module")
def phantom_slices(tmp_path_factory):
    """Real storage slices: a skull-stripped T1w phantom through the data-prep code.

    At 2 mm in a 128 px frame the brain covers 18% of a slice on average (3-37%), as the
    demo shards' 256 px slices do (18.6%).
    """
    path, _ = write_phantom(tmp_path_factory.mktemp("phantom") / "t1.nii.gz", 3,
                            spacing=(2.0, 2.0, 2.0), skull_stripped=True)
    volume = preprocess_volume(path, PrepConfig(target_spacing=None, size=128))[0]
    return volume.slices[::3], volume.fg_mean, volume.fg_std  # 19 slices


# Full-slice crops with only the bias field on, so each crop is the slice times its field.
BIAS_ONLY = dataclasses.replace(
    IDENTITY, global_size=128, local_size=16, blur_probs=(0.0, 0.0, 0.0),
    solarize_probs=(0.0, 0.0, 0.0), bias_field_prob=1.0)


def _intensities(views, mean, std):
    """z-scored crops [B, n, S, S, 1] back to r = storage value / 255."""
    return (np.asarray(views[..., 0], np.float64) * std + mean) / 255.0


def test_bias_field_keeps_bright_tissue_and_the_mean_brightness(phantom_slices):
    """The field neither saturates bright tissue (no plateau at the top value, as a clip at 1
    made of white matter) nor changes a crop's mean foreground intensity."""
    pixels, mean, std = phantom_slices
    n = len(pixels)
    out = _jitted(BIAS_ONLY)(jax.random.key(0), jnp.asarray(pixels), jnp.full(n, mean),
                             jnp.full(n, std))
    biased = _intensities(out["global"], mean, std)  # [n, 2, 128, 128]
    fg = pixels > 0
    raw = pixels / 255.0
    raw_top = np.mean([(x[m] == 1.0).mean() for x, m in zip(raw, fg)])
    top = [(c[m] >= c[m].max() - 1e-6).mean() for crops, m in zip(biased, fg) for c in crops]
    assert abs(np.mean(top) - raw_top) <= 0.01, (np.mean(top), raw_top)

    ratio = biased / np.where(fg, raw, 1.0)[:, None]
    spreads = []
    for crops, m, x in zip(ratio, fg, raw):
        for field in crops:
            spreads.append(np.log(field[m]).std())
            # Brightness-neutral: the foreground mean intensity is the slice's own.
            np.testing.assert_allclose((field[m] * x[m]).mean(), x[m].mean(), rtol=1e-5)
    assert np.median(spreads) > 0.03 and min(spreads) > 0.005  # real fields, not constants


def test_bias_field_is_drawn_per_crop_or_shared_by_option(phantom_slices):
    """Per crop by default, so teacher and student views never share one field."""
    pixels, mean, std = phantom_slices
    n = len(pixels)
    args = (jax.random.key(1), jnp.asarray(pixels), jnp.full(n, mean), jnp.full(n, std))
    per_crop = _intensities(_jitted(BIAS_ONLY)(*args)["global"], mean, std)
    shared_config = dataclasses.replace(BIAS_ONLY, bias_field_per_crop=False)
    shared = _intensities(_jitted(shared_config)(*args)["global"], mean, std)
    fg = pixels > 0
    # Per crop: the two global views of a slice differ by the ratio of two fields.
    spreads = [np.log(per_crop[s, 0][fg[s]] / per_crop[s, 1][fg[s]]).std() for s in range(n)]
    assert np.median(spreads) > 0.03 and min(spreads) > 0.005
    # Shared: the same box and field on both global crops, hence the same image.
    np.testing.assert_allclose(shared[:, 0], shared[:, 1], atol=1e-6)


def _box_fraction(mask: np.ndarray, box: np.ndarray) -> float:
    """Exact float64 foreground fraction of a continuous box: per-pixel overlap lengths."""
    top, left, h, w = (float(v) for v in box)
    edges_y, edges_x = np.arange(mask.shape[0] + 1.0), np.arange(mask.shape[1] + 1.0)
    oy = np.clip(np.minimum(edges_y[1:], top + h) - np.maximum(edges_y[:-1], top), 0, None)
    ox = np.clip(np.minimum(edges_x[1:], left + w) - np.maximum(edges_x[:-1], left), 0, None)
    return float(oy @ mask.astype(np.float64) @ ox / (h * w))


def test_crop_boxes_are_redrawn_off_the_background_without_changing_the_size_law():
    height = width = 96
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - 30) ** 2 + (xx - 62) ** 2 < 16 ** 2  # a small off-centre brain: 9% of the slice
    n = 2000
    keys = jax.random.split(jax.random.key(4), n)

    @functools.partial(jax.jit, static_argnums=(2,))
    def boxes(keys, mask, min_foreground):
        return jax.vmap(lambda k: sample_crop_box(k, height, width, (0.05, 0.32), (3 / 4, 4 / 3),
                                                  mask, min_foreground))(keys)

    plain = np.asarray(boxes(keys, mask, 0.0), np.float64)
    redrawn = np.asarray(boxes(keys, mask, 0.1), np.float64)
    before = np.array([_box_fraction(mask, b) for b in plain])
    after = np.array([_box_fraction(mask, b) for b in redrawn])
    assert np.mean(before < 0.1) > 0.4
    assert np.mean(after < 0.1) < 0.01
    # Only the position is re-drawn: the areas keep their uniform law, and boxes stay inside.
    area = redrawn[:, 2] * redrawn[:, 3] / (height * width)
    assert scipy.stats.kstest(area, scipy.stats.uniform(0.05, 0.27).cdf).pvalue > 1e-3
    np.testing.assert_allclose(area, plain[:, 2] * plain[:, 3] / (height * width), rtol=1e-6)
    assert (redrawn[:, 0] >= 0).all() and (redrawn[:, 0] + redrawn[:, 2] <= height + 1e-3).all()
    assert (redrawn[:, 1] >= 0).all() and (redrawn[:, 1] + redrawn[:, 3] <= width + 1e-3).all()


def test_local_crops_of_real_slices_hold_foreground(phantom_slices):
    """Through augment_batch on real slices: hardly a local crop is (almost) background.

    Without the re-draw, 10.5% of these local crops hold < 10% foreground (11.1% on the
    demo shards, see benchmarks/input_throughput.py).
    """
    pixels, mean, std = phantom_slices
    n = len(pixels)
    config = AugmentConfig(global_size=32, local_size=16, n_local=8, background=-1e4, channels=1)
    out = _jitted(config)(jax.random.key(5), jnp.asarray(pixels), jnp.full(n, mean),
                          jnp.full(n, std))
    fractions = (np.asarray(out["local"][..., 0]) != -1e4).mean(axis=(2, 3))  # [n, 8]
    assert fractions.shape == (n, 8)
    assert np.mean(fractions < 0.1) <= 0.01


def test_bad_config_and_inputs_name_the_field():
    with pytest.raises(ValueError, match="AugmentConfig.channels"):
        AugmentConfig(channels=2).validate()
    with pytest.raises(ValueError, match=r"AugmentConfig.global_scale"):
        AugmentConfig(global_scale=(0.5, 1.5)).validate()
    with pytest.raises(ValueError, match=r"AugmentConfig.blur_probs\[1\]"):
        AugmentConfig(blur_probs=(1.0, 1.1, 0.5)).validate()
    with pytest.raises(ValueError, match=r"AugmentConfig.brightness"):
        AugmentConfig(brightness=-0.1).validate()
    with pytest.raises(ValueError, match=r"AugmentConfig.ratio"):
        AugmentConfig(ratio=(0.75,)).validate()
    AugmentConfig().validate()
    # augment_batch itself refuses a bad config instead of silently doing something else
    # (an unknown interpolation used to fall through to bicubic).
    with pytest.raises(ValueError, match="AugmentConfig.interpolation"):
        augment_batch(jax.random.key(0), jnp.zeros((2, 8, 8), jnp.uint8), jnp.ones(2),
                      jnp.ones(2), AugmentConfig(interpolation="nearest"))
    assert hash(AugmentConfig(global_scale=[0.4, 1.0])) == hash(AugmentConfig(global_scale=(0.4, 1.0)))
    with pytest.raises(ValueError, match="pixels"):
        augment_batch(jax.random.key(0), jnp.zeros((2, 8, 8), jnp.float32), jnp.ones(2),
                      jnp.ones(2), SMALL)
    with pytest.raises(ValueError, match="fg_std"):
        augment_batch(jax.random.key(0), jnp.zeros((2, 8, 8), jnp.uint8), jnp.ones(2),
                      jnp.ones(3), SMALL)
