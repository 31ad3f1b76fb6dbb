"""Backbone throughput: forward and forward+backward images/s and achieved FLOP/s, printed as JSON.

CPU default (about 2 minutes): vit_small at 96 and 224 px, batch 4, float32, comparing
jax.nn.dot_product_attention with matmul attention (models/vit.py) in the same run.
GPU example: --sizes vit_base vit_large --dtype bfloat16 --batch 64 --attention dot_product
             --attention-implementation cudnn
FLOPs come from braindino_jax.models.flops (forward formula; forward+backward = 3x forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from braindino_jax.models.config import vit_config
from braindino_jax.models.flops import vit_forward_flops, vit_train_flops
from braindino_jax.models.vit import VisionTransformer, abstract_vit


def _time(fn, args, steps: int) -> tuple[float, float]:
    """(compile + first run seconds, median seconds per later run)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def measure(size: str, resolution: int, batch: int, dtype: str, attention: str,
            implementation: str | None, remat: bool, steps: int) -> dict:
    config = vit_config(size, dtype=dtype, attention=attention,
                        attention_implementation=implementation, remat=remat)
    graphdef, _ = nnx.split(abstract_vit(config))
    state = jax.jit(lambda: nnx.state(VisionTransformer(config, rngs=nnx.Rngs(0))))()
    images = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3), jnp.float32)

    def features(s, x):
        out = nnx.merge(graphdef, s)(x)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]

    def loss(s, x):
        cls, patches = features(s, x)
        return jnp.mean(cls**2) + jnp.mean(patches**2)

    forward = jax.jit(features)
    train = jax.jit(jax.value_and_grad(loss))
    fwd_compile, fwd_s = _time(forward, (state, images), steps)
    bwd_compile, bwd_s = _time(train, (state, images), steps)
    fwd_flops = vit_forward_flops(config, resolution, resolution) * batch
    train_flops = vit_train_flops(config, resolution, resolution) * batch
    return {
        "size": size, "resolution": resolution, "batch": batch, "dtype": dtype,
        "attention": attention, "attention_implementation": implementation, "remat": remat,
        "forward_images_per_s": round(batch / fwd_s, 2),
        "forward_backward_images_per_s": round(batch / bwd_s, 2),
        "forward_gflops_per_image": round(fwd_flops / batch / 1e9, 3),
        "forward_tflops_per_s": round(fwd_flops / fwd_s / 1e12, 4),
        "forward_backward_tflops_per_s": round(train_flops / bwd_s / 1e12, 4),
        "compile_plus_first_run_s": {"forward": round(fwd_compile, 2), "forward_backward": round(bwd_compile, 2)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["vit_small"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[96, 224])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", nargs="+", default=["dot_product", "matmul"],
                        choices=["dot_product", "matmul"])
    parser.add_argument("--attention-implementation", default=None, choices=[None, "xla", "cudnn"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    results = [
        measure(size, res, args.batch, args.dtype, attention, args.attention_implementation, args.remat, args.steps)
        for size in args.sizes for res in args.resolutions for attention in args.attention
    ]
    device = jax.devices()[0]
    print(json.dumps({"backend": jax.default_backend(), "device": device.device_kind,
                      "device_count": jax.device_count(), "jax": jax.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
