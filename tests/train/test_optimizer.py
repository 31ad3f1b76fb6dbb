"""Parameter groups and the optimizer: DINOv3's rules, and torch's AdamW as the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from braindino_jax.models.config import ViTConfig
from braindino_jax.models.heads import HeadConfig
from braindino_jax.train.optimizer import build_optimizer
from braindino_jax.train.param_groups import param_groups, path_names
from braindino_jax.train.state import init_params

VIT = ViTConfig(embed_dim=32, depth=3, num_heads=2, patch_size=8, n_storage_tokens=2, qkv_bias=True)
HEAD = HeadConfig(in_dim=32, out_dim=16, hidden_dim=24, bottleneck_dim=8)


def _named(tree):
    return {"/".join(path_names(p)): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scan", [False, True])
def test_groups_follow_dinov3_rules(scan):
    params = init_params(VIT.replace(scan_blocks=scan), HEAD, HEAD, 0)
    groups = param_groups(params, VIT.depth, 0.9, 0.2, scan)
    lr, wd, last = _named(groups["lr"]), _named(groups["wd"]), _named(groups["last_layer"])
    zero_wd = {name for name, v in wd.items() if v == 0.0}
    for name in lr:
        leaf = name.split("/")[-1]
        expect_zero = (leaf in ("bias", "gamma", "cls_token", "storage_tokens", "mask_token")
                       or "norm" in name)
        assert (name in zero_wd) == expect_zero, name
    assert {n for n, v in last.items() if v} == {"dino_head/last_layer", "ibot_head/last_layer"}
    depth = VIT.depth
    if scan:
        np.testing.assert_allclose(np.ravel(lr["backbone/blocks/attn/qkv/kernel"]),
                                   [0.9 ** (depth - i) for i in range(depth)], rtol=1e-6)
    else:
        for i in range(depth):
            assert lr[f"backbone/blocks/{i}/mlp/fc1/kernel"] == pytest.approx(0.9 ** (depth - i))
    assert lr["backbone/patch_embed/kernel"] == pytest.approx(0.9 ** (depth + 1) * 0.2)
    assert lr["backbone/cls_token"] == pytest.approx(0.9 ** (depth + 1))
    assert lr["backbone/norm/scale"] == 1.0
    assert lr["dino_head/mlp/0/kernel"] == 1.0 and lr["ibot_head/last_layer"] == 1.0


def test_update_equals_torch_adamw_per_param_group_with_clipping():
    """Three steps of our chain against torch.optim.AdamW with DINOv3-style param groups and
    torch's clip_grad_norm_ per submodule, on the same gradients."""
    params = init_params(VIT, HEAD, HEAD, 0)
    groups = param_groups(params, VIT.depth, 0.9, 0.2, False)
    tx = build_optimizer(groups, clip_grad=0.5)
    opt_state = tx.init(params)
    names = list(_named(params))
    lr_mult, wd_mult = _named(groups["lr"]), _named(groups["wd"])
    torch_params = {n: torch.nn.Parameter(torch.tensor(np.asarray(v))) for n, v in _named(params).items()}
    torch_groups = [{"params": [torch_params[n]], "name": n, "lr_multiplier": lr_mult[n],
                     "wd_multiplier": wd_mult[n]} for n in names]
    torch_opt = torch.optim.AdamW(torch_groups, betas=(0.9, 0.999), eps=1e-8)
    rng = np.random.default_rng(0)
    step = jax.jit(lambda p, s, g, lr, wd: tx.update(g, s, p, lr=lr, weight_decay=wd,
                                                       last_layer_lr_scale=1.0))
    for it in range(3):
        lr, wd = 1e-2 * (it + 1), 0.04 + 0.1 * it
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
        updates, opt_state = step(params, opt_state, grads, lr, wd)
        params = optax.apply_updates(params, updates)
        for n, g in _named(grads).items():
            torch_params[n].grad = torch.tensor(np.asarray(g))
        for sub in ("backbone", "dino_head", "ibot_head"):
            torch.nn.utils.clip_grad_norm_([p for n, p in torch_params.items()
                                            if n.startswith(sub + "/")], max_norm=0.5)
        for group in torch_opt.param_groups:
            group["lr"] = lr * group["lr_multiplier"]
            group["weight_decay"] = wd * group["wd_multiplier"]
        torch_opt.step()
    for n, v in _named(params).items():
        np.testing.assert_allclose(np.asarray(v), torch_params[n].detach().numpy(),
                                   rtol=2e-5, atol=1e-6, err_msg=n)


def test_last_layer_frozen_exactly_while_scale_is_zero():
    params = init_params(VIT, HEAD, HEAD, 0)
    tx = build_optimizer(param_groups(params, VIT.depth, 0.9, 0.2, False))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    frozen, _ = tx.update(grads, state, params, lr=1e-2, weight_decay=0.04, last_layer_lr_scale=0.0)
    moved, _ = tx.update(grads, state, params, lr=1e-2, weight_decay=0.04, last_layer_lr_scale=1.0)
    new = optax.apply_updates(params, frozen)
    for head in ("dino_head", "ibot_head"):
        np.testing.assert_array_equal(new[head]["last_layer"], params[head]["last_layer"])
        assert np.abs(np.asarray(moved[head]["last_layer"])).min() > 0
    assert np.abs(np.asarray(frozen["dino_head"]["mlp"][0]["kernel"])).min() > 0
