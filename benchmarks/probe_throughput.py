"""Probe feature-extraction throughput, printed as JSON.

1. ``extraction``: volumes/s of ``extract_features`` at 128 slices of 224 px per volume, on
   1 mm phantom volumes (int16 .nii.gz, as from a scanner), split into preprocessing time (the
   data-prep library, in this process) and model time (on pre-read volumes), then end to end
   without and with the pool of preprocessing workers. ``input_wait_s`` is the time the device
   loop waited for preprocessed volumes (worker start-up included).
2. ``backbone``: our ViT-B/16 against timm's ``vit_base_patch16_dinov3`` holding the same
   converted (random) weights, on 128 slices of 224 px in batches, float32 and bfloat16 (timm:
   ``torch.autocast``), torch inference mode with torch's thread count = the machine's cores
   (XLA's CPU backend uses all cores). ``ours_as_built`` is the backbone as models/ builds it,
   ``ours_probe`` the probes' execution (``encoders.with_execution`` with ``extract.attention
   = "auto"``: matmul attention on CPU; in bfloat16, bf16 matmuls that return float32).
   ``max_abs_cls_diff`` is against timm float32.
3. ``attention``: one ViT-B attention layer's core, [batch, 201 tokens, 12 heads, 64]:
   ``jax.nn.dot_product_attention``, the same maths as one einsum per product (heads left in
   place), and models/vit.py's ``matmul_attention`` (heads folded into a contiguous batch).
4. ``gemm``: the backbone's largest matmul alone (ViT-B's MLP fc1 at ``--batch`` slices:
   [batch x 201, 768] x [768, 3072], float32 accumulation), XLA against torch, in GFLOP/s:
   the ceiling that XLA's CPU matmul sets on the backbone comparison.

Every variant is timed ``--rounds`` times, interleaved with the others, and the best round is
reported: other processes on the machine can only slow a round down.

CPU default (10-20 minutes on 2 cores): python benchmarks/probe_throughput.py
GPU: python benchmarks/probe_throughput.py --sections extraction --extract-arch vit_base --workers 8
"""

# Spawned preprocessing workers re-import this script: keep its top level light (no JAX).
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _best_of(runners: dict, rounds: int) -> tuple[dict, dict]:
    """Outputs of a warm-up call and the best wall time over ``rounds`` interleaved rounds."""
    outputs = {key: run() for key, run in runners.items()}
    best = {}
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    return outputs, best


def extraction(args, folder: Path) -> dict:
    from braindino_jax.preprocessing.config import PrepConfig
    from braindino_jax.preprocessing.phantom import write_phantom
    from braindino_jax.probes.encoders import load_encoder
    from braindino_jax.probes.features import ExtractionSettings, FeatureExtractor, VolumeJob, extract_features
    from braindino_jax.probes.volumes import read_probe_volume

    paths = [str(write_phantom(folder / f"sub-{i:02d}_T1w.nii.gz", 1000 + i, skull_stripped=True)[0])
             for i in range(args.volumes)]
    prep = PrepConfig(n_slices=args.slices, size=args.size)
    settings = ExtractionSettings(prep, args.size, batch_size=args.batch)
    encoder = load_encoder(f"random-active:{args.extract_arch}", dtype=args.extract_dtype)
    extractor = FeatureExtractor(encoder, settings)

    start = time.perf_counter()
    volumes = [read_probe_volume(p, prep) for p in paths]
    preprocess_s = (time.perf_counter() - start) / len(paths)
    extractor.embed(volumes[0])  # compile
    start = time.perf_counter()
    for volume in volumes:
        extractor.embed(volume)
    model_s = (time.perf_counter() - start) / len(paths)

    runs = {}
    for workers in (0, args.workers):
        stats = extract_features(encoder, [VolumeJob(p) for p in paths], settings, workers=workers,
                                 extractor=extractor).stats
        runs[f"workers_{workers}"] = {
            "volumes_per_s": round(len(paths) / stats["wall_s"], 3),
            "wall_s": round(stats["wall_s"], 2),
            "input_wait_s": round(stats.get("input_wait_s", 0.0), 2),
            "device_wait_s": round(stats.get("device_wait_s", 0.0), 2),
            "preprocess_s_in_workers": round(stats.get("preprocess_s", 0.0), 2),
        }
    return {
        "encoder": encoder.spec, "dtype": args.extract_dtype, "volumes": len(paths),
        "slices_per_volume": args.slices, "image_size": args.size, "batch": extractor.batch_size,
        "preprocess_s_per_volume": round(preprocess_s, 3), "model_s_per_volume": round(model_s, 3),
        "volumes_per_s_if_serial": round(1.0 / (preprocess_s + model_s), 3),
        "volumes_per_s_if_overlapped": round(1.0 / max(preprocess_s / max(args.workers, 1), model_s), 3),
        **runs,
    }


def backbone(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import timm
    import torch
    from flax import nnx

    from braindino_jax.models.convert import load_backbone
    from braindino_jax.models.vit import abstract_vit
    from braindino_jax.probes.encoders import resolve_attention, with_execution

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_base_patch16_dinov3", pretrained=False).eval()
    with torch.no_grad():  # LayerScale 1, so that every block (and its precision) counts
        for name, p in timm_model.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
    ours, _ = load_backbone({k: v.numpy() for k, v in timm_model.state_dict().items()})
    images = np.random.default_rng(0).normal(size=(args.compare_slices, 224, 224, 3)).astype(np.float32)
    batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]

    def jax_runner(model):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["x_norm_clstoken"])
        device_batches = [jnp.asarray(b) for b in batches]
        return lambda: np.concatenate([np.asarray(forward(state, b)) for b in device_batches])

    def timm_runner(bf16: bool):
        torch_batches = [torch.from_numpy(b.transpose(0, 3, 1, 2).copy()) for b in batches]

        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return np.concatenate([timm_model.forward_features(b)[:, 0].float().numpy() for b in torch_batches])

        return run

    def as_built(dtype: str):
        model = nnx.merge(nnx.split(abstract_vit(ours.config.replace(dtype=dtype)))[0], nnx.state(ours))
        model.eval()
        return model

    runners = {}
    for dtype in args.dtypes:
        probe = with_execution(ours, dtype=dtype, attention=resolve_attention("auto", dtype) or ours.config.attention)
        runners[("timm", dtype, "sdpa")] = timm_runner(dtype == "bfloat16")
        runners[("ours_as_built", dtype, ours.config.attention)] = jax_runner(as_built(dtype))
        runners[("ours_probe", dtype, probe.config.attention)] = jax_runner(probe)
    outputs, best = _best_of(runners, args.rounds)
    reference = next((v for k, v in outputs.items() if k[:2] == ("timm", "float32")), None)
    results = []
    for (impl, dtype, attention), seconds in best.items():
        row = {"impl": impl, "dtype": dtype, "attention": attention,
               "images_per_s": round(args.compare_slices / seconds, 3),
               "s_per_volume_of_128": round(seconds * 128 / args.compare_slices, 2)}
        if reference is not None:
            row["max_abs_cls_diff"] = float(np.abs(outputs[(impl, dtype, attention)] - reference).max())
        results.append(row)
    return {"model": "vit_base_patch16_dinov3 (random weights, LayerScale 1)", "slices": args.compare_slices,
            "batch": args.batch, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "results": results}


def attention(args) -> dict:
    import jax
    import jax.numpy as jnp

    from braindino_jax.models.vit import matmul_attention

    def einsum_attention(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    implementations = {"dot_product_attention": jax.nn.dot_product_attention, "einsum": einsum_attention,
                       "matmul_attention": matmul_attention}
    runners = {}
    for dtype in args.dtypes:
        q = jax.random.normal(jax.random.key(0), (args.batch, 201, 12, 64)).astype(dtype)
        for name, fn in implementations.items():
            compiled = jax.jit(fn)
            runners[(name, dtype)] = lambda compiled=compiled, q=q: jax.block_until_ready(compiled(q, q, q))
    _, best = _best_of(runners, args.rounds)
    return {"shape": [args.batch, 201, 12, 64],
            "results": [{"impl": name, "dtype": dtype, "ms": round(s * 1000, 1)} for (name, dtype), s in best.items()]}


def gemm(args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    m, k, n = args.batch * 201, 768, 3072
    runners = {}
    for dtype in args.dtypes:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        compiled = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        runners[("xla", dtype)] = lambda compiled=compiled, a=a, b=b: jax.block_until_ready(compiled(a, b))
        ta, tb = torch.ones(m, k, dtype=getattr(torch, dtype)), torch.ones(k, n, dtype=getattr(torch, dtype))

        def torch_run(ta=ta, tb=tb):
            with torch.inference_mode():
                return ta @ tb

        runners[("torch", dtype)] = torch_run
    _, best = _best_of(runners, max(args.rounds, 3))
    return {"shape": [m, k, n], "torch_threads": torch.get_num_threads(),
            "results": [{"impl": impl, "dtype": dtype, "gflop_per_s": round(2 * m * k * n / s / 1e9, 1)}
                        for (impl, dtype), s in best.items()]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["extraction", "backbone", "attention"],
                        choices=["extraction", "backbone", "attention", "gemm"])
    parser.add_argument("--volumes", type=int, default=6)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extract-arch", default="vit_small(embed_dim=192,depth=4,num_heads=3)",
                        help="ARCH of the encoder in the extraction section (see probes/encoders.py)")
    parser.add_argument("--extract-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compare-slices", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    # One host device: the comparison with torch is of one process, not of virtual shards.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    import jax

    report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            report[section] = extraction(args, Path(tmp)) if section == "extraction" else globals()[section](args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
