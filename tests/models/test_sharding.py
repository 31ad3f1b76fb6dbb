"""A batch-sharded forward on 8 CPU devices equals the single-device result."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from braindino_jax.models.config import ViTConfig
from braindino_jax.models.vit import VisionTransformer


def test_sharded_forward_matches_single_device():
    assert jax.device_count() == 8
    model = VisionTransformer(ViTConfig(embed_dim=64, depth=2, num_heads=4, patch_size=8), rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))

    def features(state, x):
        return nnx.merge(graphdef, state)(x)["x_norm_clstoken"]

    single = jax.jit(features)(state, images)

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    replicated = NamedSharding(mesh, P())
    sharded_fn = jax.jit(features, in_shardings=(replicated, batch), out_shardings=batch)
    out = sharded_fn(jax.device_put(state, replicated), jax.device_put(images, batch))
    assert len(out.sharding.device_set) == 8
    assert out.addressable_shards[0].data.shape == (2, 64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-6)
