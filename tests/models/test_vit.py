"""Backbone behaviour on tiny models (shapes, masking, drop path, layers, dtypes, remat, scan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from braindino_jax.models.config import ModelConfigError, ViTConfig, vit_config
from braindino_jax.models.vit import VisionTransformer, abstract_vit, count_params, drop_path, matmul_attention

TINY = ViTConfig(embed_dim=64, depth=3, num_heads=4, n_storage_tokens=2, patch_size=8)


def forward(model, images, **kwargs):
    return nnx.jit(lambda m, x: m(x, **kwargs))(model, images)


@pytest.fixture(scope="module")
def tiny():
    model = VisionTransformer(TINY, rngs=nnx.Rngs(0))
    model.eval()
    # LayerScale at 1e-5 would hide the blocks; make them matter for the comparisons below.
    for block in model.blocks:
        block.ls1.gamma[...] = jnp.full((64,), 0.5)
        block.ls2.gamma[...] = jnp.full((64,), 0.5)
    return model


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (2, 32, 48, 3))


def copy_params(src, config):
    """The same parameters in a model built with different execution options."""
    from braindino_jax.models.convert import backbone_to_meta, meta_to_backbone

    model = meta_to_backbone(backbone_to_meta(src), config)
    model.eval()
    return model


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (32, 48)])
def test_tiny_shapes_and_dtypes(tiny, hw):
    out = forward(tiny, jnp.ones((2, *hw, 3)))
    n = (hw[0] // 8) * (hw[1] // 8)
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_storage_tokens"].shape == (2, 2, 64)
    assert out["x_norm_patchtokens"].shape == (2, n, 64)
    assert out["x_prenorm"].shape == (2, 3 + n, 64)
    assert all(out[k].dtype == jnp.float32 for k in ("x_norm_clstoken", "x_norm_patchtokens"))


@pytest.mark.parametrize("name", ["vit_small", "vit_base", "vit_large", "vit_giant"])
def test_named_sizes_shapes_abstractly(name):
    """Every size at 224, 96 and 512x224, traced with abstract weights (nothing allocated)."""
    config = vit_config(name, dtype="bfloat16", scan_blocks=name in ("vit_large", "vit_giant"))
    graphdef, state = nnx.split(abstract_vit(config))
    for h, w in [(224, 224), (96, 96), (512, 224)]:
        x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
        n = (h // 16) * (w // 16)
        assert out["x_norm_clstoken"].shape == (2, config.embed_dim)
        assert out["x_storage_tokens"].shape == (2, 4, config.embed_dim)
        assert out["x_norm_patchtokens"].shape == (2, n, config.embed_dim)
        assert out["x_norm_patchtokens"].dtype == jnp.float32


def timm_meta_param_count(**kwargs):
    import timm

    with torch.device("meta"):
        model = timm.create_model(**kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name,timm_kwargs",
    [
        ("vit_small", dict(model_name="vit_small_patch16_dinov3")),
        ("vit_base", dict(model_name="vit_base_patch16_dinov3")),
        ("vit_large", dict(model_name="vit_large_patch16_dinov3")),
        # DINOv3's ViT-giant2: the same Eva recipe with a SwiGLU FFN of hidden width 4096
        ("vit_giant", dict(model_name="vit_large_patch16_dinov3", embed_dim=1536, depth=40,
                           num_heads=24, swiglu_mlp=True, swiglu_align_to=8, mlp_ratio=4096 / 1536)),
    ],
)
def test_param_counts_match_timm(name, timm_kwargs):
    ours = count_params(abstract_vit(vit_config(name)))
    # timm drops DINOv3's pretraining-only mask token (embed_dim parameters)
    assert ours == timm_meta_param_count(**timm_kwargs) + vit_config(name).embed_dim


def test_vit_base_count_from_formula():
    d, f, p, r, depth = 768, 3072, 16, 4, 12
    block = 2 * 2 * d + d * 3 * d + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    top = (3 * p * p * d + d) + d + r * d + d + 2 * d  # patch, cls, storage, mask, final norm
    assert count_params(abstract_vit(vit_config("vit_base"))) == top + depth * block == 85_641_984


def test_mask_token_replaces_exactly_masked_positions(tiny, images):
    tiny.mask_token[...] = jnp.full((1, 64), 7.0)
    masks = jnp.zeros((2, 24), bool).at[0, jnp.array([1, 5, 23])].set(True).at[1, 0].set(True)
    plain, _ = tiny.prepare_tokens(images)
    masked, _ = tiny.prepare_tokens(images, masks)
    m = np.asarray(masks)
    patches, ref = np.asarray(masked[:, 3:]), np.asarray(plain[:, 3:])
    np.testing.assert_array_equal(patches[m], 7.0)
    np.testing.assert_array_equal(patches[~m], ref[~m])
    np.testing.assert_array_equal(masked[:, :3], plain[:, :3])
    tiny.mask_token[...] = jnp.zeros((1, 64))


def test_intermediate_layers(tiny, images):
    out = forward(tiny, images, layers=(0, -1))
    last = out["intermediate_layers"][1]
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        np.testing.assert_allclose(last[key], out[key], rtol=1e-6, atol=1e-6)
    # block 0 by hand: tokens -> block -> final norm
    x, (h, w) = tiny.prepare_tokens(images)
    sin, cos = tiny.rope_embed(h, w)
    first = tiny.norm(tiny.blocks[0](x, sin, cos))
    np.testing.assert_allclose(out["intermediate_layers"][0]["x_norm_patchtokens"], first[:, 3:], atol=1e-5)
    layers = tiny.get_intermediate_layers(images, 2, reshape=True)
    assert len(layers) == 2 and layers[1]["x_norm_patchtokens"].shape == (2, 4, 6, 64)
    np.testing.assert_allclose(layers[1]["x_norm_patchtokens"].reshape(2, 24, 64), out["x_norm_patchtokens"], atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        tiny(images, layers=(3,))


def test_drop_path_statistics():
    x = jnp.ones((20000, 1, 1))
    y = np.asarray(drop_path(x, 0.25, jax.random.key(0))).ravel()
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02
    assert abs(y.mean() - 1.0) < 0.03


def test_drop_path_active_in_train_off_in_eval(tiny, images):
    model = copy_params(tiny, TINY.replace(drop_path_rate=0.5))
    reference = forward(tiny, images)["x_norm_clstoken"]
    np.testing.assert_allclose(forward(model, images)["x_norm_clstoken"], reference, atol=1e-6)
    model.train()
    with pytest.raises(ValueError, match="key="):
        model(images)
    run = nnx.jit(lambda m, x, k: m(x, key=k)["x_norm_clstoken"])
    a, b = run(model, images, jax.random.key(0)), run(model, images, jax.random.key(1))
    assert not np.allclose(a, b)
    assert not np.allclose(a, reference)
    np.testing.assert_array_equal(a, run(model, images, jax.random.key(0)))


def test_bf16_agrees_with_f32(tiny, images):
    bf16 = copy_params(tiny, TINY.replace(dtype="bfloat16"))
    ref, out = forward(tiny, images), forward(bf16, images)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert out[key].dtype == jnp.float32
        rel = np.linalg.norm(out[key] - ref[key]) / np.linalg.norm(ref[key])
        assert rel < 3e-2, (key, rel)
    assert bf16.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize("options", [dict(scan_blocks=True), dict(remat=True), dict(attention="matmul")])
def test_execution_options_give_same_outputs(tiny, images, options):
    other = copy_params(tiny, TINY.replace(**options))
    ref, out = forward(tiny, images, layers=(1,)), forward(other, images, layers=(1,))
    np.testing.assert_allclose(out["x_prenorm"], ref["x_prenorm"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["intermediate_layers"][0]["x_norm_patchtokens"],
                               ref["intermediate_layers"][0]["x_norm_patchtokens"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matmul_attention_is_softmax_attention_and_survives_extreme_logits(dtype, tol):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in keys)
    q = q.at[0, 0, 0].mul(1e4)  # logits of order 1e4 in one row: a max-shifted softmax stays finite
    out = matmul_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))
    assert out.shape == q.shape and out.dtype == dtype
    logits = np.einsum("bqhd,bkhd->bhqk", np.float64(q), np.float64(k)) / np.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", probs, np.float64(v))
    assert np.all(np.isfinite(np.float32(out)))
    np.testing.assert_allclose(np.float32(out), ref, rtol=tol, atol=tol * 3)


def test_scan_remat_gradients_and_drop_path_match_loop(tiny, images):
    config = TINY.replace(drop_path_rate=0.3, drop_path_schedule="linear")
    loop = copy_params(tiny, config)
    scan = copy_params(tiny, config.replace(scan_blocks=True, remat=True))

    def grads(model):
        model.train()

        def loss(m):
            return jnp.sum(m(images, key=jax.random.key(5))["x_norm_clstoken"] ** 2)

        value, g = nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(model)
        return value, g

    (v1, g1), (v2, g2) = grads(loop), grads(scan)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(g1["blocks"][2]["attn"]["qkv"]["kernel"][...],
                               g2["blocks"]["attn"]["qkv"]["kernel"][...][2], rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="in_chans"):
        tiny(jnp.ones((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="patch_size=8"):
        tiny(jnp.ones((1, 30, 32, 3)))
    with pytest.raises(ValueError, match="masks must be bool"):
        tiny(jnp.ones((1, 32, 32, 3)), jnp.zeros((1, 15), bool))


@pytest.mark.parametrize(
    "changes,field",
    [(dict(num_heads=5), "num_heads"), (dict(ffn_layer="geglu"), "ffn_layer"),
     (dict(drop_path_rate=1.0), "drop_path_rate"), (dict(dtype="fp8"), "dtype"),
     (dict(rope_jitter_coords=0.5), "rope_jitter_coords"),
     (dict(attention_implementation="cuDNN"), "attention_implementation"),
     (dict(attention_implementation="cudnn"), "attention_implementation")],  # float32
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ModelConfigError, match=f"ViTConfig.{field}"):
        TINY.replace(**changes)


def test_one_channel_input():
    model = VisionTransformer(TINY.replace(in_chans=1, depth=1), rngs=nnx.Rngs(0))
    assert forward(model, jnp.ones((1, 16, 16, 1)))["x_norm_clstoken"].shape == (1, 64)
