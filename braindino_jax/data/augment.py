"""Multi-crop augmentation on the accelerator, from uint8 slices and per-sample PRNG keys.

The host only ships fixed-size uint8 slices with their foreground statistics; everything
random happens here, inside `jit`, so a host with few cores per chip never starves the step.

Per crop, in this order (all in float32):
  1. a random-resized crop box (torchvision semantics, continuous boxes). Its position is
     re-drawn, up to `foreground_tries` times, while the box holds less than
     `min_foreground_fraction` foreground; the slice and its foreground mask are resampled with
     `jax.image.scale_and_translate` and normalised by the resampled mask (as is the blur), so
     the brain's edge is not darkened by background;
  2. a smooth multiplicative bias field, drawn per crop, scaled so that the crop's mean
     foreground intensity is unchanged;
  3. brightness/contrast, then gamma, on intensities in [0, 1] units;
  4. Gaussian blur, solarisation, Gaussian noise;
  5. a left-right flip;
  6. the BrainDINO foreground z-score from the record's stored `fg_mean`/`fg_std`
     (uint8 units): `z = (255 r - fg_mean) / fg_std` on the foreground.

Against DINOv3 (`dinov3/data/augmentations.py`, `transforms.py`), choice by choice:
  - Bicubic resampling (antialiased), as its RandomResizedCrop (PIL's bicubic, which this
    matches): MRI gives no reason to differ. It costs about 10% more augmentation time than
    bilinear on CPU, where augmentation is 0.17% of a train step's FLOPs
    (benchmarks/input_throughput.py).
  - Blur probabilities (0, 0.9, 0.5) for (global 1, global 2, each local): DINOv3's
    `GaussianBlur(p)` passes `1 - p` to `RandomApply`, so its released models ran these, not
    the paper's (1, 0.1, 0.5). We run what produced the published features; it also leaves the
    teacher one global view with its fine texture intact. Kernel as DINOv3: 9 taps,
    sigma ~ U(0.1, 2) output pixels, reflect padding; we blur over the foreground only.
  - Solarisation of global crop 2 with p = 0.2 at 128/255, as DINOv3 (`RandomSolarize`).
    MRI gives no reason to drop it: the order of tissue brightness is a property of the
    contrast (T1 and T2 reverse it), not of the anatomy the features should describe.
    Background stays empty.
  - Colour jitter and grayscale have no MRI meaning. The bias field, brightness/contrast, gamma
    and noise stand in for them, each drawn per crop as DINOv3 draws its jitter, so two views
    compared by the losses never share one intensity distortion (`bias_field_per_crop=False`
    shares the field over a sample's crops, as one scan has one field).
  - Not in DINOv3: crops of (almost) pure background are re-drawn. A natural image has no
    empty part, a brain slice is mostly empty; such crops teach nothing.
  - No upper clip: the bias field and the contrast jitter may take intensities above 1 and
    they stay ordered (a clip at 1 turned bright white matter into one flat plateau). Only
    negatives are clipped, because gamma needs r >= 0.

Background (the crop's resampled foreground mask < 0.5) is set to `background`, 0.0 by
default: storage keeps background at 0 (skull-stripped), and nnU-Net-style masked z-scoring
leaves it at 0, so the network sees the same "empty = 0" convention at train and probe time.
Intensity augmentations therefore never leak into the background.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

_METHODS = ("bilinear", "bicubic")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Multi-crop and intensity settings; defaults follow DINOv3/BrainDINO (see DESIGN.md).

    `*_probs` triples are (global crop 1, global crop 2, each local crop).
    """

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    min_foreground_fraction: float = 0.1  # of the crop box; re-drawn below this
    foreground_tries: int = 10            # positions tried; else the one with most foreground
    flip_prob: float = 0.5
    bias_field_prob: float = 0.3
    bias_field_coefficient: float = 0.3   # polynomial coefficients ~ U[-c, c] of log-field
    bias_field_order: int = 3
    bias_field_per_crop: bool = True
    brightness_contrast_prob: float = 0.8
    brightness: float = 0.1               # additive shift ~ U[-b, b], intensities in [0, 1]
    contrast: float = 0.25                # factor ~ U[1 - c, 1 + c] around the foreground mean
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)   # log-uniform
    blur_probs: tuple[float, float, float] = (0.0, 0.9, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)    # pixels of the output crop, as DINOv3
    blur_kernel_size: int = 9
    solarize_probs: tuple[float, float, float] = (0.0, 0.2, 0.0)
    solarize_threshold: float = 128 / 255           # r >= this becomes 1 - r
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.05)    # intensities in [0, 1]
    background: float = 0.0
    channels: int = 3
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Lists from an ml_collections config become tuples: the config is a static jit
        # argument and must be hashable.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def fail(field: str, reason: str) -> None:
            raise ValueError(f"AugmentConfig.{field}: {reason}")

        for field in ("global_size", "local_size", "foreground_tries"):
            if getattr(self, field) < 1:
                fail(field, f"must be >= 1, got {getattr(self, field)}")
        if self.n_local < 0:
            fail("n_local", f"must be >= 0, got {self.n_local}")
        for field in ("global_scale", "local_scale", "ratio", "gamma_range", "blur_sigma",
                      "noise_std"):
            if len(getattr(self, field)) != 2:
                fail(field, f"need (lo, hi), got {getattr(self, field)}")
        for field in ("global_scale", "local_scale"):
            lo, hi = getattr(self, field)
            if not 0 < lo <= hi <= 1:
                fail(field, f"need 0 < lo <= hi <= 1, got {(lo, hi)}")
        for field in ("ratio", "gamma_range"):
            lo, hi = getattr(self, field)
            if not 0 < lo <= hi:
                fail(field, f"need 0 < lo <= hi, got {(lo, hi)}")
        for field in ("blur_sigma", "noise_std"):
            lo, hi = getattr(self, field)
            if not 0 <= lo <= hi:
                fail(field, f"need 0 <= lo <= hi, got {(lo, hi)}")
        if self.blur_sigma[0] <= 0:
            fail("blur_sigma", f"lower bound must be > 0, got {self.blur_sigma}")
        if self.blur_kernel_size < 3 or self.blur_kernel_size % 2 == 0:
            fail("blur_kernel_size", f"must be odd and >= 3, got {self.blur_kernel_size}")
        for field in ("blur_probs", "solarize_probs"):
            if len(getattr(self, field)) != 3:
                fail(field, f"need 3 values (global 1, global 2, locals), got {getattr(self, field)}")
        probs = {
            "flip_prob": self.flip_prob,
            "bias_field_prob": self.bias_field_prob,
            "brightness_contrast_prob": self.brightness_contrast_prob,
            "gamma_prob": self.gamma_prob,
            "noise_prob": self.noise_prob,
            "min_foreground_fraction": self.min_foreground_fraction,
            "solarize_threshold": self.solarize_threshold,
        }
        for field in ("blur_probs", "solarize_probs"):
            probs.update({f"{field}[{i}]": p for i, p in enumerate(getattr(self, field))})
        for field, p in probs.items():
            if not 0 <= p <= 1:
                fail(field, f"must be in [0, 1], got {p}")
        if self.interpolation not in _METHODS:
            fail("interpolation", f"must be one of {_METHODS}, got {self.interpolation!r}")
        if self.channels not in (1, 3):
            fail("channels", f"must be 1 or 3, got {self.channels}")
        if self.dtype not in _DTYPES:
            fail("dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        if self.bias_field_order < 0:
            fail("bias_field_order", f"must be >= 0, got {self.bias_field_order}")
        if not 0 <= self.brightness:
            fail("brightness", f"must be >= 0, got {self.brightness}")
        if not 0 <= self.contrast < 1:
            fail("contrast", f"need 0 <= contrast < 1, got {self.contrast}")


_CROP_TRIES = 10  # (area, aspect ratio) draws before the centred fallback, as torchvision


def _n_box_uniforms(position_tries: int) -> int:
    return 2 * _CROP_TRIES + 2 * position_tries


def _overlap(start: jax.Array, length: jax.Array, n: int) -> jax.Array:
    """[..., n] length of [start, start + length) inside each pixel [i, i + 1)."""
    edges = jnp.arange(n, dtype=jnp.float32)
    lo = jnp.maximum(edges, start[..., None])
    hi = jnp.minimum(edges + 1, (start + length)[..., None])
    return jnp.maximum(hi - lo, 0.0)


def _box_foreground(mask: jax.Array, top, left, box_h, box_w) -> jax.Array:
    """Exact foreground fraction of continuous boxes [top, top + h) x [left, left + w).

    The mask is constant on each pixel, so the covered area is the separable sum of the
    box's overlap with each pixel row and column: two small matmuls, no gathers.
    """
    rows = _overlap(top, jnp.broadcast_to(box_h, top.shape), mask.shape[0])
    cols = _overlap(left, jnp.broadcast_to(box_w, left.shape), mask.shape[1])
    area = jnp.sum(jnp.matmul(rows, mask, precision=jax.lax.Precision.HIGHEST) * cols, axis=-1)
    return area / (box_h * box_w)


def _crop_box_from_uniforms(
    u: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    foreground: jax.Array | None = None,
    min_foreground: float = 0.0,
) -> jax.Array:
    """Box from `_n_box_uniforms(tries)` uniforms in [0, 1) (see `sample_crop_box`)."""
    area = float(height * width)
    s = scale[0] + (scale[1] - scale[0]) * u[:_CROP_TRIES]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = jnp.exp(log_lo + (log_hi - log_lo) * u[_CROP_TRIES:2 * _CROP_TRIES])
    w = jnp.sqrt(s * area * r)
    h = jnp.sqrt(s * area / r)
    fits = (w <= width) & (h <= height)
    first = jnp.argmax(fits)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = height * ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    any_fits = jnp.any(fits)
    box_h = jnp.where(any_fits, h[first], fallback_h)
    box_w = jnp.where(any_fits, w[first], fallback_w)

    # Positions: the first with enough foreground, else the one with the most. The box size
    # is drawn once, so the area and aspect-ratio laws are those of torchvision exactly.
    positions = u[2 * _CROP_TRIES:].reshape(-1, 2)
    tops = positions[:, 0] * (height - box_h)
    lefts = positions[:, 1] * (width - box_w)
    pick = 0
    if foreground is not None and min_foreground > 0:
        fraction = _box_foreground(foreground, tops, lefts, box_h, box_w)
        enough = fraction >= min_foreground
        pick = jnp.where(jnp.any(enough), jnp.argmax(enough), jnp.argmax(fraction))
    return jnp.stack([tops[pick], lefts[pick], box_h, box_w]).astype(jnp.float32)


def sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    foreground: jax.Array | None = None,
    min_foreground: float = 0.0,
    position_tries: int = 10,
) -> jax.Array:
    """Random-resized-crop box `[top, left, h, w]` (float32 pixels), torchvision semantics.

    Area fraction ~ U(scale), aspect ratio w/h log-uniform in `ratio`; the first of ten
    candidates that fits is used, else a centred crop with the ratio clamped. Boxes are
    continuous (not rounded): the resampler handles sub-pixel boxes, and the area law holds
    exactly instead of up to rounding. With a `foreground` mask [height, width], the box's
    position is the first of `position_tries` uniform draws whose foreground fraction is at
    least `min_foreground`, else the draw with the most foreground (a bounded, static-shape
    rejection sampler; the size law is unchanged).
    """
    if foreground is not None:
        foreground = jnp.asarray(foreground, jnp.float32)
    u = jax.random.uniform(key, (_n_box_uniforms(position_tries),))
    return _crop_box_from_uniforms(u, height, width, scale, ratio, foreground, min_foreground)


def crop_resize(image: jax.Array, box: jax.Array, size: int, method: str) -> jax.Array:
    """Resample the box `[top, left, h, w]` of `image` [H, W, C] to [size, size, C]."""
    top, left, box_h, box_w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / box_h, size / box_w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(
        image,
        (size, size, image.shape[-1]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=translation,
        method="linear" if method == "bilinear" else "cubic",
        antialias=True,
    )


def _monomials(order: int) -> list[tuple[int, int]]:
    """Exponents (i, j) of y^i x^j up to `order`, without the constant (brightness) term."""
    return [(i, j) for i in range(order + 1) for j in range(order + 1 - i) if i + j > 0]


def _bias_field(coeffs: jax.Array, box: jax.Array, size: int, height: int, width: int,
                order: int) -> jax.Array:
    """exp(polynomial) evaluated at the crop's pixel centres in slice coordinates [-1, 1].

    The polynomial is Y C X^T with the powers Y = [y^i], X = [x^j] and C[i, j] the
    coefficient of y^i x^j: two small matmuls instead of one [size, size] map per term.
    """
    top, left, box_h, box_w = box[0], box[1], box[2], box[3]
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    ys = (top + centres * box_h) / height * 2 - 1
    xs = (left + centres * box_w) / width * 2 - 1
    powers = jnp.arange(order + 1, dtype=jnp.float32)
    terms = _monomials(order)
    place = np.zeros((len(terms), (order + 1) ** 2), np.float32)  # coefficient -> C[i, j]
    place[np.arange(len(terms)), [i * (order + 1) + j for i, j in terms]] = 1.0
    highest = jax.lax.Precision.HIGHEST
    table = jnp.matmul(coeffs, place, precision=highest).reshape(order + 1, order + 1)
    log_field = jnp.matmul(jnp.matmul(ys[:, None] ** powers, table, precision=highest),
                           (xs[:, None] ** powers).T, precision=highest)
    return jnp.exp(log_field)


def _bias_coefficients(u: jax.Array, config: AugmentConfig) -> jax.Array:
    """Log-field coefficients from `len(_monomials) + 1` uniforms; all 0 when not applied."""
    coeffs = config.bias_field_coefficient * (2 * u[1:] - 1)
    return jnp.where(u[0] < config.bias_field_prob, coeffs, 0.0)


def _blur_matrix(size: int, sigma: jax.Array, radius: int) -> jax.Array:
    """[size, size] matrix applying a 1-D Gaussian with reflect padding (a matmul, not taps)."""
    taps = np.arange(-radius, radius + 1)
    source = np.arange(size)[:, None] + taps[None, :]
    source = np.abs(source)
    source = np.where(source >= size, 2 * (size - 1) - source, source)
    one_hot = np.eye(size, dtype=np.float32)[source]  # [size, taps, size]
    kernel = jnp.exp(-0.5 * (jnp.asarray(taps, jnp.float32) / sigma) ** 2)
    kernel = kernel / jnp.sum(kernel)
    return jnp.einsum("itj,t->ij", one_hot, kernel)


def _masked_blur(image: jax.Array, fg: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of a square [S, S] image over its foreground only.

    Normalised convolution, blur(image * fg) / blur(fg), so the background does not darken
    the brain's edge; reflect padding at the crop border.
    """
    matrix = _blur_matrix(image.shape[0], sigma, radius)
    weight = fg.astype(jnp.float32)
    blurred = matrix @ (image * weight) @ matrix.T
    coverage = matrix @ weight @ matrix.T
    return jnp.where(fg, blurred / jnp.maximum(coverage, 1e-6), image)


_N_SCALARS = 11  # per-crop uniforms after the box: see _augment_crop


def _augment_crop(
    key: jax.Array,
    stacked: jax.Array,
    foreground: jax.Array | None,
    fg_mean: jax.Array,
    fg_std: jax.Array,
    shared_bias: jax.Array,
    blur_prob: jax.Array,
    solarize_prob: jax.Array,
    size: int,
    scale: tuple[float, float],
    config: AugmentConfig,
) -> jax.Array:
    """One crop [size, size] of z-scored intensities from `stacked` [H, W, 2] = (r, mask)."""
    height, width = stacked.shape[:2]
    k_uniform, k_noise = jax.random.split(key)
    # One draw of all scalar uniforms per crop: far fewer PRNG ops to compile than a key each.
    n_box = _n_box_uniforms(config.foreground_tries)
    n_bias = len(_monomials(config.bias_field_order)) + 1 if config.bias_field_per_crop else 0
    u = jax.random.uniform(k_uniform, (n_box + _N_SCALARS + n_bias,))
    box = _crop_box_from_uniforms(u[:n_box], height, width, scale, config.ratio, foreground,
                                  config.min_foreground_fraction)
    bias = _bias_coefficients(u[n_box + _N_SCALARS:], config) if n_bias else shared_bias
    u = u[n_box:n_box + _N_SCALARS]

    def between(x, lo, hi):
        return lo + (hi - lo) * x

    crop = crop_resize(stacked, box, size, config.interpolation)
    # Normalised resampling: dividing by the resampled mask keeps the brain's edge at its
    # own intensity instead of mixing in background zeros (a dark rim never seen at test time).
    coverage = crop[..., 1]
    fg = coverage >= 0.5
    r = jnp.where(fg, crop[..., 0] / jnp.maximum(coverage, 0.5), 0.0)

    biased = r * _bias_field(bias, box, size, height, width, config.bias_field_order)
    # Brightness-neutral: the crop's mean foreground intensity is kept (x / x == 1 exactly, so
    # a crop without a field is unchanged bit for bit).
    r = biased * (jnp.sum(r) / jnp.maximum(jnp.sum(biased), 1e-12))

    mu = fg_mean / 255.0
    contrast = between(u[0], 1 - config.contrast, 1 + config.contrast)
    brightness = between(u[1], -config.brightness, config.brightness)
    jittered = (r - mu) * contrast + mu + brightness
    r = jnp.where(u[2] < config.brightness_contrast_prob, jittered, r)
    r = jnp.maximum(r, 0.0)  # gamma needs r >= 0; values above 1 stay ordered

    gamma = jnp.exp(between(u[3], math.log(config.gamma_range[0]), math.log(config.gamma_range[1])))
    r = jnp.where(u[4] < config.gamma_prob, r ** gamma, r)

    sigma = between(u[5], config.blur_sigma[0], config.blur_sigma[1])
    radius = min(config.blur_kernel_size // 2, size - 1)
    r = jnp.where(u[6] < blur_prob, _masked_blur(r, fg, sigma, radius), r)

    solarized = jnp.where(r >= config.solarize_threshold, 1.0 - r, r)
    r = jnp.where(u[7] < solarize_prob, solarized, r)

    noise_std = between(u[8], config.noise_std[0], config.noise_std[1])
    noisy = r + noise_std * jax.random.normal(k_noise, r.shape, jnp.float32)
    r = jnp.where(u[9] < config.noise_prob, noisy, r)

    flip = u[10] < config.flip_prob
    r = jnp.where(flip, r[:, ::-1], r)
    fg = jnp.where(flip, fg[:, ::-1], fg)

    z = (255.0 * r - fg_mean) / fg_std
    return jnp.where(fg, z, jnp.float32(config.background))


def _augment_sample(key, pixels, fg_mean, fg_std, config: AugmentConfig):
    k_bias, k_global, k_local = jax.random.split(key, 3)
    r = pixels.astype(jnp.float32) / 255.0
    mask = pixels > 0
    stacked = jnp.stack([r, mask.astype(jnp.float32)], axis=-1)
    foreground = stacked[..., 1] if config.min_foreground_fraction > 0 else None
    shared_bias = None
    if not config.bias_field_per_crop:  # one field per sample, as one scan has one field
        n_terms = len(_monomials(config.bias_field_order))
        shared_bias = _bias_coefficients(jax.random.uniform(k_bias, (n_terms + 1,)), config)

    def crops(key, n, size, scale, blur_probs, solarize_probs):
        def one(k, blur_prob, solarize_prob):
            return _augment_crop(k, stacked, foreground, fg_mean, fg_std, shared_bias, blur_prob,
                                 solarize_prob, size, scale, config)

        return jax.vmap(one)(jax.random.split(key, n), blur_probs, solarize_probs)

    def probs(values, n):
        return jnp.broadcast_to(jnp.asarray(values, jnp.float32), (n,))

    globals_ = crops(k_global, 2, config.global_size, config.global_scale,
                     probs(config.blur_probs[:2], 2), probs(config.solarize_probs[:2], 2))
    locals_ = crops(k_local, config.n_local, config.local_size, config.local_scale,
                    probs(config.blur_probs[2], config.n_local),
                    probs(config.solarize_probs[2], config.n_local))
    return globals_, locals_


def _sharded_like(x: jax.Array, reference: jax.Array) -> jax.Array:
    """Give `x` the batch-axis sharding of `reference` under Explicit mesh axes.

    vmap requires every mapped input to carry the same explicit sharding; the per-sample
    indices are created replicated, the pixels arrive split over ('data', 'fsdp').
    """
    sharding = jax.typeof(reference).sharding
    if not sharding.spec or sharding.spec[0] is None:
        return x
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
    return jax.sharding.reshard(x, target)


def augment_batch(
    key: jax.Array,
    pixels: jax.Array,
    fg_mean: jax.Array,
    fg_std: jax.Array,
    config: AugmentConfig,
) -> dict[str, jax.Array]:
    """Multi-crop a batch of uint8 slices; call inside `jit` (config is static).

    Args:
      key: one PRNG key for the batch; it is split into one key per sample, so the samples
        differ and a sample's crops do not depend on the batch size.
      pixels: uint8 [B, H, W], 0 = background.
      fg_mean, fg_std: [B] foreground statistics in uint8 units (from the record).

    Returns:
      {"global": [B, 2, G, G, C], "local": [B, n_local, L, L, C]} in `config.dtype`.
    """
    config.validate()  # at trace time: a typo such as interpolation="bicubc" must not run
    if pixels.ndim != 3 or pixels.dtype != jnp.uint8:
        raise ValueError(f"pixels: expected uint8 [B, H, W], got {pixels.dtype} {pixels.shape}")
    batch = pixels.shape[0]
    for name, value in (("fg_mean", fg_mean), ("fg_std", fg_std)):
        if value.shape != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {value.shape}")
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(_sharded_like(jnp.arange(batch), pixels))
    globals_, locals_ = jax.vmap(lambda k, p, m, s: _augment_sample(k, p, m, s, config))(
        keys, pixels, fg_mean.astype(jnp.float32), fg_std.astype(jnp.float32)
    )
    dtype = jnp.dtype(config.dtype)

    def channels(x):
        x = x[..., None]
        if config.channels == 3:
            x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
        return x.astype(dtype)

    return {"global": channels(globals_), "local": channels(locals_)}
