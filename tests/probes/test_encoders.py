"""Encoder specs: every kind loads, random controls match a checkpoint's architecture,
fingerprints track parameters, and bad specs name themselves."""

import json

import jax
import numpy as np
import pytest

from braindino_jax.models.convert import export_backbone, save_flax_checkpoint
from braindino_jax.models.vit import build_vit
from braindino_jax.probes.encoders import architecture, fingerprint, load_encoder, with_execution
from braindino_jax.probes.errors import ProbeConfigError

TINY = "vit_small(embed_dim=64,depth=2,num_heads=2)"  # as tests/probes/conftest.py
IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def cls(model):
    return np.asarray(model(IMAGES)["x_norm_clstoken"])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model = build_vit("vit_small", embed_dim=64, depth=2, num_heads=2, seed=3)
    path = tmp_path_factory.mktemp("export") / "backbone"
    save_flax_checkpoint(path, model)
    return path, model


def test_random_specs_parse_size_overrides_and_seed():
    a = load_encoder(f"random:{TINY}")
    assert (a.config.embed_dim, a.config.depth, a.config.num_heads) == (64, 2, 2)
    assert a.config.n_storage_tokens == 4 and a.config.layerscale_init == 1e-5  # BrainDINO defaults
    b = load_encoder(f"random:{TINY}@1")
    assert a.fingerprint == load_encoder(f"random:{TINY}@0").fingerprint != b.fingerprint
    active = load_encoder(f"random-active:{TINY}@1")
    assert all(np.all(blk.ls1.gamma[...] == 1) and np.all(blk.ls2.gamma[...] == 1) for blk in active.model.blocks)
    np.testing.assert_array_equal(active.model.patch_embed.kernel[...], b.model.patch_embed.kernel[...])
    # LayerScale 1e-5 leaves the blocks nearly silent; gammas of 1 make them count.
    tokens = b.model(IMAGES)["x_prenorm"]
    embedded, _ = b.model.prepare_tokens(IMAGES)
    assert float(np.abs(tokens - embedded).max()) < 1e-3
    assert float(np.abs(active.model(IMAGES)["x_prenorm"] - embedded).max()) > 0.1


def test_export_and_like_spec_share_the_architecture(export_dir, tmp_path):
    path, model = export_dir
    exported = load_encoder(f"export:{path}")
    model.eval()
    np.testing.assert_array_equal(cls(exported.model), cls(model))
    control = load_encoder(f"random:like=export:{path}@5")
    assert architecture(control.config) == architecture(exported.config)
    assert control.fingerprint != exported.fingerprint
    config_json = tmp_path / "vit.json"
    config_json.write_text(json.dumps(exported.config.to_dict()))
    assert architecture(load_encoder(f"random:{config_json}").config) == architecture(exported.config)


def test_dinov3_spec_reads_converted_folders_and_raw_files(export_dir, tmp_path):
    path, model = export_dir
    export_backbone(model, tmp_path / "raw.safetensors")
    raw = load_encoder(f"dinov3:{tmp_path / 'raw.safetensors'}")
    folder = load_encoder(f"dinov3:{path}")
    assert raw.fingerprint == folder.fingerprint == load_encoder(f"export:{path}").fingerprint


def test_fingerprint_follows_parameters_not_execution_settings():
    model = build_vit("vit_small", embed_dim=64, depth=2, num_heads=2, seed=0)
    before = fingerprint(model)
    assert fingerprint(with_execution(model, dtype="bfloat16")) == before
    model.blocks[0].ls1.gamma[...] = model.blocks[0].ls1.gamma[...].at[0].add(1e-7)
    assert fingerprint(model) != before


def test_scanned_blocks_are_unstacked_with_the_same_outputs():
    scanned = build_vit("vit_small", embed_dim=64, depth=2, num_heads=2, scan_blocks=True, seed=0)
    scanned.eval()
    unstacked = with_execution(scanned)
    assert not unstacked.config.scan_blocks and len(unstacked.blocks) == 2
    np.testing.assert_allclose(cls(unstacked), cls(scanned), rtol=1e-5, atol=1e-5)
    assert len(unstacked(IMAGES, layers=(0, 1))["intermediate_layers"]) == 2


@pytest.mark.parametrize("spec, pattern", [
    ("resnet:50", r"encoder 'resnet:50': expected KIND:ARG"),
    ("random:vit_tiny", r"architecture 'vit_tiny' is not a size name"),
    ("random:vit_small(depth=four)", r"ViTConfig.depth"),
    ("random:vit_small(num_heads=5)", r"ViTConfig.num_heads"),
    ("export:/no/such/folder", r"encoder 'export:/no/such/folder': /no/such/folder is not a checkpoint folder"),
    ("dinov3:/no/such.pth", r"no such file or folder /no/such.pth"),
])
def test_bad_specs_name_the_spec(spec, pattern):
    with pytest.raises(ProbeConfigError, match=pattern):
        load_encoder(spec)
