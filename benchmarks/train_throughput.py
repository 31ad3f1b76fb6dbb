"""Train-step throughput, memory and MFU for a config, plus the cost of checkpointing. JSON out.

    python benchmarks/train_throughput.py                                   # CPU: debug_cpu
    python benchmarks/train_throughput.py --config configs/braindino_vitb16.py --batch 128 \\
        --variants base remat --save-every 10                               # one GPU

Each variant (``base``, ``remat``, ``scan``, ``remat+scan``) compiles the same step with that
execution setting and runs it on a synthetic batch in the same process, so they compare on the
same machine state. FLOPs are analytic (``braindino_jax.models.flops``): the student's forward
and backward on every crop (3 x forward), the teacher's forward on the global crops, and the
DINO/iBOT heads on the tokens they see; the peak is a matmul measured in the same run (bf16 on
accelerators, float32 on CPU), so MFU = achieved / measured peak. ``--save-every N`` adds the
step time with an async Orbax save every N steps against none, and the restore time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from braindino_jax.data import masking  # noqa: E402
from braindino_jax.models.flops import vit_forward_flops  # noqa: E402
from braindino_jax.train import setup as train_setup  # noqa: E402
from braindino_jax.train.checkpoint import Checkpointer  # noqa: E402
from braindino_jax.train.config import build_spec, load_config  # noqa: E402

VARIANTS = {"base": {}, "remat": {"remat": True}, "scan": {"scan_blocks": True},
            "remat+scan": {"remat": True, "scan_blocks": True}, "matmul_attention": {"attention": "matmul"}}


def head_flops(head, tokens: int) -> int:
    dims = head.layer_dims
    mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    return tokens * (mlp + 2 * head.bottleneck_dim * head.out_dim)


def step_flops(setup) -> int:
    """Analytic FLOPs of one train step (see the module docstring)."""
    spec = setup.spec
    b, a = spec.batch_size, spec.augment
    g = vit_forward_flops(spec.vit, a.global_size, a.global_size)
    l = vit_forward_flops(spec.vit, a.local_size, a.local_size)
    student = 3 * (2 * b * g + a.n_local * b * l)
    teacher = 2 * b * g
    masked = setup.mask_bound * spec.groups
    heads = (3 * head_flops(spec.dino_head, 2 * b + a.n_local * b) + head_flops(spec.dino_head, 2 * b)
             + 4 * head_flops(spec.ibot_head, masked))
    return student + teacher + heads


def synthetic_batch(setup, seed: int = 0) -> dict[str, jax.Array]:
    spec = setup.spec
    rng = np.random.default_rng(seed)
    b, size = spec.batch_size, spec.pipeline.image_size
    yy, xx = np.mgrid[:size, :size] - size / 2
    disc = (yy**2 + xx**2) < (0.4 * size) ** 2
    pixels = np.where(disc, rng.integers(20, 256, (b, size, size)), 0).astype(np.uint8)
    p = spec.pipeline
    masks = np.concatenate([masking.sample_masks(rng, 2 * spec.group_batch, spec.mask_grid,
                                                 p.mask_sample_probability, p.mask_ratio_range)
                            for _ in range(spec.groups)]).reshape(b, 2, -1)
    batch = {"pixels": pixels, "fg_mean": np.full(b, 130, np.float32),
             "fg_std": np.full(b, 60, np.float32), "masks": masks}
    return jax.device_put(batch, setup.batch_sharding)


def peak_matmul_flops() -> float:
    on_cpu = jax.default_backend() == "cpu"
    n, dtype = (2048, jnp.float32) if on_cpu else (8192, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(5 if on_cpu else 20):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_steps(setup, state, batch, steps, checkpointer=None, every=0, iterator=None, config=None):
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = setup.step(state, batch)
        if checkpointer is not None and (i + 1) % every == 0:
            checkpointer.save(i + 1, state, iterator, config)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    return state, times


def measure(config, variant: str, steps: int, save_every: int) -> dict:
    config.model.vit.update(VARIANTS[variant])
    spec = build_spec(config, check_data=False)
    setup = train_setup.build(spec)
    t = time.perf_counter()
    state = train_setup.init_state(setup)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    setup.step.lower(setup.state_spec(), setup.batch_spec()).compile()
    compile_s = time.perf_counter() - t
    batch = synthetic_batch(setup)
    state, _ = time_steps(setup, state, batch, 2)  # warm-up
    state, times = time_steps(setup, state, batch, steps)
    step_s = statistics.median(times)
    flops = step_flops(setup)
    out = {"variant": variant, "compile_s": round(compile_s, 2), "init_s": round(init_s, 2),
           "step_s": round(step_s, 4), "images_per_s": round(spec.batch_size / step_s, 2),
           "step_tflop": round(flops / 1e12, 4), "achieved_tflops": round(flops / step_s / 1e12, 4),
           "peak_device_bytes": peak_memory()}
    if save_every:
        import grain

        with tempfile.TemporaryDirectory() as workdir:
            iterator = iter(grain.MapDataset.range(10**6).to_iter_dataset())
            checkpointer = Checkpointer(workdir, every=save_every, keep=2)
            state, saving = time_steps(setup, state, batch, steps, checkpointer, save_every,
                                       iterator, config)
            checkpointer.wait()
            t = time.perf_counter()
            _, restored = checkpointer.restore(setup.state_spec(), None)
            jax.block_until_ready(restored)
            restore_s = time.perf_counter() - t
            checkpointer.close()
        out.update({"save_every": save_every,
                    "step_s_with_async_saves": round(statistics.mean(saving), 4),
                    "step_s_without_saves": round(statistics.mean(times), 4),
                    "restore_s": round(restore_s, 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/debug_cpu.py")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["base", "remat"], choices=sorted(VARIANTS))
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256, help="stored slice size")
    p.add_argument("--flops-only", action="store_true",
                   help="print the analytic FLOPs of one step for the config and batch, run nothing")
    args, overrides = p.parse_known_args()
    if args.flops_only:
        config = load_config(args.config, overrides)
        config.data.image_size = args.image_size
        if args.batch:
            config.train.batch_size = args.batch
        setup = train_setup.build(build_spec(config, check_data=False, device_count=1, process_count=1))
        print(json.dumps({"config": args.config, "batch": setup.spec.batch_size,
                          "step_tflop": round(step_flops(setup) / 1e12, 3)}))
        return
    peak = peak_matmul_flops()
    results = []
    for variant in args.variants:
        config = load_config(args.config, overrides)
        config.data.image_size = args.image_size
        if args.batch:
            config.train.batch_size = args.batch
        r = measure(config, variant, args.steps, args.save_every)
        r["mfu"] = round(r["achieved_tflops"] * 1e12 / peak, 4)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps({"backend": jax.default_backend(), "devices": jax.device_count(),
                      "device_kind": jax.devices()[0].device_kind, "config": args.config,
                      "overrides": overrides, "batch": args.batch,
                      "peak_matmul_tflops": round(peak / 1e12, 3), "results": results}))


if __name__ == "__main__":
    main()
