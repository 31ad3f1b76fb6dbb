"""DINO/iBOT head against a float64 numpy reference and a PyTorch module with DINOv3's keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy.special import erf

from braindino_jax.models.convert import head_to_torch, torch_to_head
from braindino_jax.models.heads import DINOHead, HeadConfig
from braindino_jax.ssl.normalize import l2_normalize

CFG = HeadConfig(in_dim=24, out_dim=40, nlayers=3, hidden_dim=32, bottleneck_dim=16)


def reference(state, x, weight_norm):
    h = x.astype(np.float64)
    for i in range(3):
        h = h @ state[f"mlp.{2 * i}.weight"].T.astype(np.float64) + state[f"mlp.{2 * i}.bias"]
        if i < 2:
            h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    w = state["last_layer.weight_v" if weight_norm else "last_layer.weight"].astype(np.float64)
    if weight_norm:
        w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return h @ w.T


@pytest.mark.parametrize("weight_norm", [False, True])
def test_head_matches_reference(weight_norm):
    head = DINOHead(CFG.replace(weight_norm=weight_norm), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    out = head(jnp.asarray(x))
    assert out.dtype == jnp.float32 and out.shape == (5, 40)
    np.testing.assert_allclose(out, reference(head_to_torch(head), x, weight_norm), rtol=1e-4, atol=1e-5)


def test_torch_dinov3_head_loads_and_agrees():
    """A torch module with DINOv3 DINOHead's layout loads our export strictly and agrees."""
    head = DINOHead(CFG, rngs=nnx.Rngs(1))
    state = head_to_torch(head)
    mlp = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                              torch.nn.GELU(), torch.nn.Linear(32, 16))
    module = torch.nn.Module()
    module.mlp, module.last_layer = mlp, torch.nn.Linear(16, 40, bias=False)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x = np.random.default_rng(1).normal(size=(3, 24)).astype(np.float32)
    with torch.no_grad():
        z = torch.nn.functional.normalize(module.mlp(torch.from_numpy(x)), dim=-1)
        ref = module.last_layer(z).numpy()
    np.testing.assert_allclose(head(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-6)
    back = torch_to_head(state)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(head))):
        np.testing.assert_array_equal(a, b)


def test_extreme_inputs_stay_finite_and_normalised():
    head = DINOHead(CFG, rngs=nnx.Rngs(2))
    x = jnp.concatenate([jnp.full((1, 24), 1e30), jnp.zeros((1, 24)), jnp.full((1, 24), -1e-30)])
    bottleneck = head(x, no_last_layer=True)
    assert np.isfinite(np.asarray(bottleneck)).all()
    assert abs(float(jnp.linalg.norm(bottleneck[0])) - 1) < 1e-5
    assert np.isfinite(np.asarray(head(x))).all()


def test_zero_bottleneck_has_finite_gradient():
    """A row whose MLP output is exactly zero (no biases, zero input) must not poison the
    gradient with NaN; torch.nn.functional.normalize gives 1/eps there."""
    head = DINOHead(CFG.replace(mlp_bias=False), rngs=nnx.Rngs(3))
    x = jnp.zeros((2, 24)).at[1].set(1.0)
    grads = nnx.grad(lambda h: jnp.sum(h(x)))(head)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    z = torch.zeros(1, 4, requires_grad=True)
    torch.nn.functional.normalize(z, dim=-1).sum().backward()
    got = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(jnp.zeros((1, 4)))
    np.testing.assert_allclose(got, z.grad.numpy(), rtol=1e-6)


def test_bad_head_config_names_field():
    with pytest.raises(ValueError, match="HeadConfig.out_dim"):
        HeadConfig(out_dim=0)
