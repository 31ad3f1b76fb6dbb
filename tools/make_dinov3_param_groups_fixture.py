"""Write tests/fixtures/dinov3_param_groups.json from Meta's own DINOv3 parameter groups.

    python tools/make_dinov3_param_groups_fixture.py /path/to/dinov3-checkout

Builds DINOv3's ``SSLMetaArch`` (``dinov3/train/ssl_meta_arch.py``) from its default config
(``dinov3/configs/ssl_default_config.yaml``: layer decay 0.9, patch-embed lr x0.2, DINO-head
wd x1, fused multi-tensor groups) with a ViT-B/16 student in a few variants, and calls its
``get_params_groups`` exactly as ``dinov3/train/train.py`` does before building AdamW. That
method runs ``get_params_groups_with_decay_fsdp`` on each student submodule (backbone, DINO
head, iBOT head) on its own, then fuses the groups; the fused groups are mapped back to the
parameter names by tensor identity. For every parameter the fixture stores its name (prefixed
by its submodule) and ``[shape, lr multiplier, wd multiplier, last-layer flag]``, so the tests can
compare ``braindino_jax.train.param_groups`` with the reference without needing the checkout.

Meta builds the backbones on the ``meta`` device, so even ViT-B costs no memory; the heads are
built small (the prototype count does not change the names). ``SSLMetaArch`` needs the
``dinov3`` package itself (its configs, models and losses), so the checkout goes on
``sys.path``; ``termcolor`` (only for DINOv3's log colours) is stubbed when not installed.
"""

import json
import sys
from pathlib import Path

from dinov3_checkout import import_dinov3

# variant -> student options over the default config (all with 4 storage tokens, as BrainDINO)
VARIANTS = {
    # DINOv3's default ViT options: qkv bias, GELU MLP
    "vitb_mlp_qkv_bias": {"n_storage_tokens": 4},
    # BrainDINO's choice: no qkv bias
    "vitb_no_qkv_bias": {"n_storage_tokens": 4, "qkv_bias": False},
    # SwiGLU FFN with the masked key bias (as DINOv3's ViT-7B, less its untied norms)
    "vitb_swiglu": {"n_storage_tokens": 4, "ffn_layer": "swiglu", "mask_k_bias": True},
}
# the student options that decide which parameters exist, as the fixture records them
STUDENT_OPTIONS = ("qkv_bias", "proj_bias", "ffn_bias", "ffn_layer", "n_storage_tokens",
                   "mask_k_bias", "layerscale", "untie_cls_and_patch_norms",
                   "untie_global_and_local_cls_norm")
SMALL_HEAD = {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


def _dumps(fixture: dict) -> str:
    """JSON with one parameter a line: ``"name": [shape, lr_mult, wd_mult, is_last_layer]``."""
    variants = []
    for variant, entry in fixture["variants"].items():
        rows = ",\n".join(f"    {json.dumps(name)}: {json.dumps(row)}"
                           for name, row in sorted(entry["params"].items()))
        variants.append(f'  {json.dumps(variant)}: {{"student": {json.dumps(entry["student"])}, '
                        f'"params": {{\n{rows}\n  }}}}')
    head = {k: v for k, v in fixture.items() if k != "variants"}
    return (json.dumps(head)[:-1] + ', "variants": {\n' + ",\n".join(variants) + "\n}}\n")


def main(dinov3_root: str, out: str = "tests/fixtures/dinov3_param_groups.json") -> None:
    from omegaconf import OmegaConf

    config_module, arch_module = import_dinov3(dinov3_root, "configs.config", "train.ssl_meta_arch")
    default = config_module.get_default_config()
    fixture = {
        "hyper": {k: default.optim[k] for k in
                  ("layerwise_decay", "patch_embed_lr_mult", "dino_head_wd_multiplier",
                   "multi_tensor_optim")},
        "arch": "vit_base",
        "head": {**SMALL_HEAD, "head_nlayers": default.dino.head_nlayers},
        "variants": {},
    }
    for variant, student in VARIANTS.items():
        cfg = OmegaConf.merge(default, {"student": {"arch": "vit_base", **student},
                                        "dino": SMALL_HEAD, "ibot": SMALL_HEAD})
        model = arch_module.SSLMetaArch(cfg)
        names = {}
        for sub, module in model.student.items():
            for name, param in module.named_parameters():
                names[id(param)] = (f"{sub}.{name}", tuple(param.shape))
        rows = {}
        for group in model.get_params_groups():
            for param in group["params"]:
                name, shape = names[id(param)]
                rows[name] = [list(shape), float(group["lr_multiplier"]),
                              float(group["wd_multiplier"]), bool(group["is_last_layer"])]
        trainable = {n for n, _ in names.values()}
        assert set(rows) == trainable, sorted(trainable ^ set(rows))
        options = {k: cfg.student[k] for k in STUDENT_OPTIONS}
        fixture["variants"][variant] = {"student": options, "params": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(_dumps(fixture))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
