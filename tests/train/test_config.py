"""Config loading, overrides and validation: every error names its field, before compiling."""

from pathlib import Path

import pytest

from braindino_jax.train.config import ConfigError, build_spec, load_config

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _fails(match, config, **kwargs):
    kwargs.setdefault("check_data", False)
    with pytest.raises(ConfigError, match=match):
        build_spec(config, device_count=kwargs.pop("device_count", 8), process_count=1, **kwargs)


def test_batch_not_divisible_by_devices_names_the_field():
    c = tiny_config(train={"batch_size": 12})
    _fails(r"^config\.train\.batch_size: 12 is not divisible by the 8 devices", c)


def test_crop_sizes_must_be_multiples_of_the_patch_size():
    _fails(r"^config\.augment\.global_size: 30 is not a multiple of the patch size 8",
           tiny_config(augment={"global_size": 30}))
    _fails(r"^config\.augment\.local_size", tiny_config(augment={"local_size": 12}))


def test_missing_or_empty_shard_patterns(tmp_path):
    c = tiny_config()
    c.data.shards = (str(tmp_path / "nothing-*.array_record"),)
    _fails(r"^config\.data\.shards: .*matches no file", c, check_data=True)
    c.data.shards = ()
    _fails(r"^config\.data\.shards: is empty", c, check_data=True)


def test_warmup_longer_than_the_run():
    _fails(r"^config\.optim\.warmup_epochs: 2\.0 epochs \(40 steps\) is longer than the run",
           tiny_config(optim={"warmup_epochs": 2.0}))


def test_other_fields_are_named():
    _fails(r"^config\.loss\.centering", tiny_config(loss={"centering": "kmeans"}))
    _fails(r"^config\.model\.vit\.num_heads", tiny_config(model={"vit": dict(num_heads=3)}))
    _fails(r"^config\.model\.arch", tiny_config(model={"arch": "vit_tiny"}))
    _fails(r"^config\.mesh\.fsdp", tiny_config(mesh={"fsdp": 3}))
    _fails(r"^config\.augment\.flip_prob", tiny_config(augment={"flip_prob": 1.5}))
    _fails(r"^config\.gram\.teacher", tiny_config(gram={"enabled": True}))
    _fails(r"^config\.train\.batch_size: .*KoLeo", tiny_config(train={"batch_size": 8}))


def test_augmentation_channels_follow_the_model():
    """in_chans=1 (braindino-convert --in-chans 1) gives 1-channel crops; they cannot disagree."""
    spec = build_spec(tiny_config(model={"vit": dict(in_chans=1)}), device_count=8,
                      process_count=1, check_data=False)
    assert spec.augment.channels == 1 and spec.vit.in_chans == 1
    c = tiny_config()
    c.augment.channels = 3
    _fails(r"^config\.augment\.channels: is derived from config\.model\.vit", c)


def test_overrides_keep_types_and_name_unknown_fields():
    config = load_config(str(ROOT / "configs" / "debug_cpu.py"),
                         ["--config.train.batch_size=32", "--config.optim.lr=0.002",
                          "--config.data.shards=('a-*.array_record','b-*.array_record')",
                          "--config.loss.centering=softmax"])
    assert config.train.batch_size == 32 and config.optim.lr == 0.002
    assert config.data.shards == ("a-*.array_record", "b-*.array_record")
    assert config.loss.centering == "softmax"
    with pytest.raises(ConfigError, match=r"^config\.train\.batchsize: no such field"):
        load_config(str(ROOT / "configs" / "debug_cpu.py"), ["--config.train.batchsize=3"])
    with pytest.raises(ConfigError, match=r"^config\.train\.batch_size: "):
        load_config(str(ROOT / "configs" / "debug_cpu.py"), ["--config.train.batch_size=big"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/nope.py")


@pytest.mark.parametrize("name", ["debug_cpu", "braindino_vitb16", "vitl16", "stage2_highres"])
def test_shipped_configs_validate(name):
    arg = ":runs/stage1" if name == "stage2_highres" else ""
    config = load_config(str(ROOT / "configs" / f"{name}.py") + arg)
    config.data.image_size = 256
    spec = build_spec(config, device_count=8, process_count=1, check_data=False)
    if name == "braindino_vitb16":
        v = spec.vit
        assert (v.embed_dim, v.depth, v.num_heads, v.n_storage_tokens, v.qkv_bias, v.norm_eps) == (
            768, 12, 12, 4, False, 1e-6)
        assert spec.dino_head.out_dim == spec.ibot_head.out_dim == 65536
        assert spec.loss.centering == "sinkhorn_knopp"
        assert (spec.augment.global_size, spec.augment.local_size, spec.augment.n_local) == (
            224, 96, 8)
        assert spec.vit.drop_path_rate == 0.1
        assert spec.schedules.lr == pytest.approx(4e-3)
    if name == "stage2_highres":
        assert spec.gram and spec.loss.gram_negatives == "keep" and spec.init_from == "runs/stage1"
