"""Conversion: timm parity, Meta format, training checkpoints, round trips, errors, CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx

from braindino_jax.cli.convert import main as convert_main
from braindino_jax.models.convert import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    backbone_to_meta,
    export_backbone,
    head_to_torch,
    load_backbone,
    load_flax_checkpoint,
    meta_key_shapes,
    read_state_dict,
    save_safetensors,
    timm_to_meta,
)
from braindino_jax.models.heads import DINOHead, HeadConfig


def randomise(model):
    """Random LayerScale/norm values so every block contributes (timm inits gamma at 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name or "norm" in name or name.endswith(("q_bias", "v_bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "norm" in name and "weight" in name else 0))
    return model.eval()


def timm_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def to_nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def timm_small():
    torch.manual_seed(0)
    return randomise(timm.create_model("vit_small_patch16_dinov3", pretrained=False))


@pytest.fixture(scope="module")
def converted_small(timm_small):
    model, heads = load_backbone(timm_state(timm_small))
    model.eval()
    assert heads == {}
    return model


@pytest.mark.parametrize("size", [224, 96])
def test_timm_vit_small_parity(timm_small, converted_small, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ref = timm_small.forward_features(x).numpy()  # final-normed [CLS, 4 registers, patches]
    out = nnx.jit(lambda m, x: m(x))(converted_small, to_nhwc(x))
    assert rel_err(out["x_norm_clstoken"], ref[:, 0]) < 1e-4
    assert rel_err(out["x_storage_tokens"], ref[:, 1:5]) < 1e-4
    assert rel_err(out["x_norm_patchtokens"], ref[:, 5:]) < 1e-4


TINY_EVA = dict(embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=32, dynamic_img_size=True,
                init_values=1e-5, rope_type="dinov3", rope_temperature=100, rope_rotate_half=True,
                use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4, use_fc_norm=False,
                num_classes=0)


@pytest.mark.parametrize("variant", [dict(qkv_bias=True), dict(qkv_bias=False, swiglu_mlp=True, swiglu_align_to=8)])
def test_tiny_timm_variants_parity(variant):
    """qkv bias (timm's q/v bias = DINOv3's k-masked qkv bias) and SwiGLU (w1/w2/w3)."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    torch.manual_seed(1)
    ref_model = randomise(Eva(**TINY_EVA, **variant, norm_layer=partial(LayerNorm, eps=1e-5)))
    model, _ = load_backbone(timm_state(ref_model), num_heads=4)
    model.eval()
    assert model.config.qkv_bias == variant.get("qkv_bias", False)
    assert model.config.ffn_layer == ("swiglu" if "swiglu_mlp" in variant else "mlp")
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        ref = ref_model.forward_features(x).numpy()
    out = model(to_nhwc(x))
    assert rel_err(out["x_norm_patchtokens"], ref[:, 5:]) < 1e-4
    assert rel_err(out["x_norm_clstoken"], ref[:, 0]) < 1e-4


def test_meta_format_keys_and_values(timm_small, converted_small):
    meta = backbone_to_meta(converted_small)
    expected = meta_key_shapes(converted_small.config)
    assert {k: v.shape for k, v in meta.items()} == expected
    # Keys DINOv3's DinoVisionTransformer(vit_small, n_storage_tokens=4, layerscale) registers
    for key, shape in [("cls_token", (1, 1, 384)), ("storage_tokens", (1, 4, 384)), ("mask_token", (1, 384)),
                       ("patch_embed.proj.weight", (384, 3, 16, 16)), ("rope_embed.periods", (16,)),
                       ("blocks.11.ls2.gamma", (384,)), ("blocks.0.attn.qkv.weight", (1152, 384)),
                       ("blocks.3.mlp.fc1.weight", (1536, 384)), ("norm.bias", (384,))]:
        assert meta[key].shape == shape
    from_timm = timm_to_meta(timm_state(timm_small))
    assert set(meta) - set(from_timm) == {"mask_token", "rope_embed.periods"}
    for key, value in from_timm.items():
        np.testing.assert_array_equal(meta[key], value)
    np.testing.assert_allclose(meta["rope_embed.periods"], timm_small.rope.periods.numpy(), rtol=1e-6)


def test_export_import_round_trip_is_exact(converted_small, tmp_path):
    heads = {"dino_head": DINOHead(HeadConfig(in_dim=384, out_dim=64, hidden_dim=32, bottleneck_dim=16),
                                   rngs=nnx.Rngs(0)),
             "ibot_head": DINOHead(HeadConfig(in_dim=384, out_dim=48, hidden_dim=32, bottleneck_dim=16,
                                              weight_norm=True), rngs=nnx.Rngs(1))}
    path = tmp_path / "model.safetensors"
    written = export_backbone(converted_small, path, heads)
    assert "backbone.blocks.0.attn.qkv.weight" in written and "ibot_head.last_layer.weight_g" in written
    model, loaded_heads = load_backbone(path)
    assert model.config == converted_small.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(converted_small))):
        np.testing.assert_array_equal(a, b)
    for name, head in heads.items():
        assert loaded_heads[name].config == head.config
        loaded = head_to_torch(loaded_heads[name])
        for key, value in head_to_torch(head).items():
            np.testing.assert_array_equal(loaded[key], value)
    # export -> import -> export is byte-identical
    again = tmp_path / "again.safetensors"
    export_backbone(model, again, loaded_heads)
    first, second = read_state_dict(path), read_state_dict(again)
    assert first.keys() == second.keys()
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value)


def test_scan_layout_round_trip(converted_small):
    scanned, _ = load_backbone(backbone_to_meta(converted_small), converted_small.config.replace(scan_blocks=True))
    assert scanned.blocks.attn.qkv.kernel[...].shape == (12, 384, 1152)
    from_scan = backbone_to_meta(scanned)
    for key, value in backbone_to_meta(converted_small).items():
        np.testing.assert_array_equal(from_scan[key], value)


def tiny_meta(mask_k_bias=True):
    model, _ = load_backbone(timm_state(randomise(_tiny_eva(qkv_bias=True))), num_heads=4)
    meta = backbone_to_meta(model)
    if not mask_k_bias:
        meta = {k: v for k, v in meta.items() if not k.endswith("bias_mask")}
    return meta


def _tiny_eva(**kw):
    from timm.models.eva import Eva

    torch.manual_seed(2)
    return Eva(**TINY_EVA, **kw)


def test_training_checkpoint_pth(tmp_path):
    """DINOv3 layout: {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}} read with weights_only."""
    meta = tiny_meta()
    head = DINOHead(HeadConfig(in_dim=64, out_dim=32, hidden_dim=16, bottleneck_dim=8), rngs=nnx.Rngs(0))
    teacher = {f"backbone.{k}": torch.from_numpy(np.array(v)) for k, v in meta.items()}
    for name in ("dino_head", "ibot_head"):
        teacher.update({f"{name}.{k}": torch.from_numpy(np.array(v)) for k, v in head_to_torch(head).items()})
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher, "iteration": torch.tensor(10)}, path)
    model, heads = load_backbone(path)
    assert model.config.qkv_bias and model.config.mask_k_bias and model.config.num_heads == 4
    assert sorted(heads) == ["dino_head", "ibot_head"]
    for key, value in backbone_to_meta(model).items():
        np.testing.assert_array_equal(value, meta[key])
    # Meta's k-masked bias: the key third of the bias has no effect
    x = jnp.ones((1, 16, 16, 3))
    k_bias = model.blocks[0].attn.qkv.bias
    before = model(x)["x_norm_clstoken"]
    k_bias[...] = k_bias[...].at[64:128].set(100.0)
    np.testing.assert_allclose(model(x)["x_norm_clstoken"], before, atol=1e-6)


def test_rgb_weights_fold_to_one_channel_exactly():
    """in_chans=1 on RGB weights: the 1-channel model on x equals the RGB model on x repeated."""
    meta = tiny_meta()
    rgb, _ = load_backbone(meta)
    gray, _ = load_backbone(meta, in_chans=1)
    assert gray.config.in_chans == 1
    assert gray.patch_embed.kernel.shape[2] == 1
    x = jax.random.uniform(jax.random.key(3), (2, 16, 24, 1))
    want = rgb(jnp.repeat(x, 3, axis=-1))
    got = gray(x)
    for name in ("x_norm_clstoken", "x_norm_patchtokens"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_bf16_safetensors(tmp_path):
    from safetensors.torch import save_file

    meta = tiny_meta(mask_k_bias=False)
    bf16 = {k: torch.from_numpy(np.array(v)).to(torch.bfloat16) for k, v in meta.items()}
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    model, _ = load_backbone(tmp_path / "bf16.safetensors", mask_k_bias=False)
    got = backbone_to_meta(model)
    for key, value in bf16.items():
        np.testing.assert_array_equal(got[key], value.float().numpy())


def test_mismatched_keys_are_listed():
    meta = tiny_meta()
    config = load_backbone(meta)[0].config
    broken = dict(meta)
    broken["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    del broken["blocks.1.norm1.weight"]
    broken["norm.bias"] = np.zeros(65, np.float32)
    with pytest.raises(CheckpointError) as info:
        load_backbone(broken, config)
    message = str(info.value)
    assert "unknown keys [blocks.0.attn.extra]" in message
    assert "missing keys [blocks.1.norm1.weight]" in message
    assert "norm.bias: file (65,) vs model (64,)" in message
    bad_mask = dict(meta)
    bad_mask["blocks.0.attn.qkv.bias_mask"] = np.full(192, np.nan, np.float32)
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.bias_mask: not finite"):
        load_backbone(bad_mask, config)


def test_released_all_zero_bias_mask_is_applied():
    """Meta's released ViT-S/B/L files store bias_mask = 0 everywhere: DINOv3 then applies no
    qkv bias at all, whatever ``qkv.bias`` holds, and so must the import."""
    meta = tiny_meta()
    released = {k: (np.zeros_like(v) if k.endswith("bias_mask") else v) for k, v in meta.items()}
    assert np.abs(released["blocks.0.attn.qkv.bias"]).max() > 0.1
    model, _ = load_backbone(released)
    no_bias = {k: (np.zeros_like(v) if k.endswith("qkv.bias") else v) for k, v in meta.items()}
    reference, _ = load_backbone(no_bias)
    x = jax.random.uniform(jax.random.key(4), (2, 16, 24, 3))
    cls = nnx.jit(lambda m, x: m(x)["x_norm_clstoken"])
    np.testing.assert_array_equal(cls(model, x), cls(reference, x))
    assert not np.allclose(cls(load_backbone(meta)[0], x), cls(reference, x))
    np.testing.assert_array_equal(backbone_to_meta(model)["blocks.1.attn.qkv.bias"], 0.0)


def test_bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        read_state_dict(corrupt)
    nested = tmp_path / "nested.pth"
    torch.save({"student": {"a": torch.zeros(1)}, "step": 3}, nested)
    with pytest.raises(CheckpointError, match="without a 'teacher'"):
        read_state_dict(nested)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not a DINOv3 backbone"):
        load_backbone({"fc.weight": np.zeros((2, 2), np.float32)})


def test_cli_round_trip(tmp_path, capsys):
    meta = tiny_meta()
    src = tmp_path / "src.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in meta.items()}, src)
    assert convert_main(["to-flax", str(src), str(tmp_path / "flax")]) == 0
    assert json.loads((tmp_path / "flax" / "config.json").read_text())["backbone"]["embed_dim"] == 64
    model, heads = load_flax_checkpoint(tmp_path / "flax")
    assert heads == {}
    assert convert_main(["to-torch", str(tmp_path / "flax"), str(tmp_path / "out.safetensors")]) == 0
    out = read_state_dict(tmp_path / "out.safetensors")
    assert out.keys() == meta.keys()
    for key, value in meta.items():
        np.testing.assert_array_equal(out[key], value)
    assert convert_main(["to-flax", str(tmp_path / "nothing.pth"), str(tmp_path / "x")]) == 2
    assert "nothing.pth: no such file" in capsys.readouterr().err


def _small_variance_eva(eps):
    """A tiny DINOv3 Eva whose tokens have small variance, as trained ones do, so that
    LayerNorm's epsilon shows in the features."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    torch.manual_seed(5)
    model = randomise(Eva(**TINY_EVA, norm_layer=partial(LayerNorm, eps=eps)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("patch_embed", "cls_token", "reg_token")):
                p.mul_(3e-3)
    return model


def test_norm_eps_follows_the_checkpoint_layout(tmp_path, capsys):
    """DINOv3 trains with LayerNorm eps 1e-6; a training checkpoint must convert with it (and
    does match that model), a released-layout file with 1e-5, a stored config with its own."""
    ref = _small_variance_eva(1e-6)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = ref.forward_features(x).numpy()[:, 0]
    meta = timm_to_meta(timm_state(ref))
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": torch.from_numpy(np.array(v)) for k, v in meta.items()}}, path)
    model, _ = load_backbone(path, num_heads=4)
    assert model.config.norm_eps == 1e-6
    assert rel_err(model(to_nhwc(x))["x_norm_clstoken"], want) < 1e-4
    wrong, _ = load_backbone(path, num_heads=4, norm_eps=1e-5)
    assert rel_err(wrong(to_nhwc(x))["x_norm_clstoken"], want) > 1e-3  # the error this guards against
    assert load_backbone(meta, num_heads=4)[0].config.norm_eps == 1e-5  # a released backbone's layout
    stored = tmp_path / "stored.safetensors"  # as export_backbone writes it, for a model with eps 3e-6
    save_safetensors(backbone_to_meta(model), stored,
                     {CONFIG_METADATA_KEY: json.dumps(model.config.replace(norm_eps=3e-6).to_dict())})
    assert load_backbone(stored)[0].config.norm_eps == 3e-6
    assert convert_main(["to-flax", str(path), str(tmp_path / "flax"), "--num-heads", "4"]) == 0
    assert "LayerNorm epsilon 1e-06: a DINOv3 training checkpoint" in capsys.readouterr().out


def test_to_flax_into_a_used_folder_is_refused_and_overwrite_replaces_it_safely(tmp_path, capsys, monkeypatch):
    meta = tiny_meta()
    src = tmp_path / "src.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in meta.items()}, src)
    out = tmp_path / "flax"
    assert convert_main(["to-flax", str(src), str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert convert_main(["to-flax", str(src), str(out), "--norm-eps", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"braindino-convert: error: {out}: the folder exists and is not empty") and "--overwrite" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # A save that fails part-way never leaves a config beside weights it does not describe.
    import orbax.checkpoint as ocp

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_main(["to-flax", str(src), str(out), "--norm-eps", "1e-6", "--overwrite"])
    with pytest.raises(CheckpointError, match="no config.json"):
        load_flax_checkpoint(out)
    monkeypatch.undo()
    assert convert_main(["to-flax", str(src), str(out), "--norm-eps", "1e-6", "--overwrite"]) == 0
    model, _ = load_flax_checkpoint(out)
    assert model.config.norm_eps == 1e-6
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_key_bias_the_file_keeps_is_applied():
    """Under RoPE a key bias changes attention (q . R(p) b_k depends on the key's position): a
    file whose bias_mask keeps the key third converts to a model that applies it, and matches
    timm's Eva run with the same k_bias."""
    from functools import partial

    from timm.layers import LayerNorm

    ref = randomise(_tiny_eva(qkv_bias=True, norm_layer=partial(LayerNorm, eps=1e-5)))
    with torch.no_grad():
        for block in ref.blocks:
            block.attn.k_bias.copy_(torch.randn(block.attn.k_bias.shape, generator=torch.Generator().manual_seed(7)))
    meta = timm_to_meta(timm_state(ref))
    for i, block in enumerate(ref.blocks):
        bias = meta[f"blocks.{i}.attn.qkv.bias"]
        meta[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([bias[:64], block.attn.k_bias.numpy(), bias[128:]])
        meta[f"blocks.{i}.attn.qkv.bias_mask"] = np.ones(192, np.float32)
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = ref.forward_features(x).numpy()
    model, _ = load_backbone(meta, num_heads=4)
    assert not model.config.mask_k_bias
    out = model(to_nhwc(x))
    assert rel_err(out["x_norm_clstoken"], want[:, 0]) < 1e-4
    assert rel_err(out["x_norm_patchtokens"], want[:, 5:]) < 1e-4
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.bias: the file applies a key bias"):
        load_backbone(meta, model.config.replace(mask_k_bias=True))


README_EXAMPLE = "Using the library from Python"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """README's example, as written there: a NIfTI file -> preprocess_volume -> the ViT's input
    layout -> one CLS feature per volume (with a tiny model saved where the example looks)."""
    import re
    from pathlib import Path

    from braindino_jax.models import build_vit, save_flax_checkpoint, vit_config
    from braindino_jax.preprocessing.phantom import write_phantom

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index(f"## {README_EXAMPLE}"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    weights = re.search(r'load_flax_checkpoint\("([^"]+)"\)', code).group(1)
    volume = re.search(r'preprocess_volume\("([^"]+)"', code).group(1)
    config = vit_config("vit_small").replace(embed_dim=32, depth=1, num_heads=2)
    save_flax_checkpoint(weights, build_vit(config))
    write_phantom(tmp_path / volume, 0, spacing=(2.0, 2.0, 2.0), skull_stripped=True)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (128, 224, 224, 3) and namespace["images"].dtype == np.float32
    assert namespace["feature"].shape == (32,)
    assert np.all(np.isfinite(namespace["feature"]))
