"""Cost of the SSL objective on the default JAX backend, and the log-domain Sinkhorn's overhead.

    python benchmarks/ssl_losses.py                               # small CPU shapes, ~1 minute
    python benchmarks/ssl_losses.py --batch 128 --prototypes 65536   # ViT-B/16 DINOv3 shapes

Prints one JSON object with milliseconds per call (median of --repeats, after compilation):
- sinkhorn_log_domain / sinkhorn_naive: teacher CLS targets [2, B, K] by the project's
  log-domain Sinkhorn-Knopp vs the reference's exp-then-divide form (written here only as a
  baseline; it overflows float32 for logits/τ > 88);
- dino / ibot / koleo: value and gradient w.r.t. the student outputs, targets included;
- objective: DINO (softmax centering) + iBOT (Sinkhorn) + 0.1·2·KoLeo, with targets, gradients
  and the center update, in one jitted call.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from braindino_jax.data import masking
from braindino_jax.ssl import centering
from braindino_jax.ssl.dino import dino_loss
from braindino_jax.ssl.ibot import ibot_loss, masked_token_indices
from braindino_jax.ssl.koleo import koleo_loss

GRID = (14, 14)


def naive_sinkhorn(teacher_logits, temperature, n_iterations=3):
    """The reference's direct form, as a speed baseline only."""
    q = jnp.exp(teacher_logits.reshape(-1, teacher_logits.shape[-1]) / temperature).T
    k, b = q.shape
    q = q / jnp.sum(q)
    for _ in range(n_iterations):
        q = q / jnp.sum(q, axis=1, keepdims=True) / k
        q = q / jnp.sum(q, axis=0, keepdims=True) / b
    return (q * b).T.reshape(teacher_logits.shape)


def time_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="images per step (global batch)")
    parser.add_argument("--prototypes", type=int, default=8192)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--koleo-group", type=int, default=None,
                        help="KoLeo group size (per-device batch); default: the whole batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    b, k, n_local, d = args.batch, args.prototypes, args.local_crops, args.embed_dim

    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    student_global, student_local = normal(2, b, k), normal(n_local, b, k)
    teacher_logits = normal(2, b, k)
    masks = masking.sample_masks(rng, 2 * b, GRID)
    bound = masking.max_masked_tokens(2 * b, GRID)
    # iBOT head outputs at the gathered masked positions (the buffer of the upper-bound size).
    patch_student, patch_teacher = normal(bound, k), normal(bound, k)
    features = normal(2, b, d)
    center = jnp.zeros(k, jnp.float32)

    sinkhorn_log = jax.jit(lambda t: centering.sinkhorn_knopp(t, 0.07))
    sinkhorn_naive = jax.jit(lambda t: naive_sinkhorn(t, 0.07))

    @jax.jit
    def dino(sg, sl, t):
        targets = centering.sinkhorn_knopp(t, 0.07)
        return jax.value_and_grad(lambda g, l: dino_loss(g, l, targets).total, (0, 1))(sg, sl)

    @jax.jit
    def ibot(s, t, m):
        _, weights = masked_token_indices(m, bound)
        targets = centering.sinkhorn_knopp(t, 0.07, valid=weights > 0)
        return jax.value_and_grad(lambda x: ibot_loss(x, targets, weights, m.shape[0]))(s)

    @jax.jit
    def koleo(f):
        return jax.value_and_grad(lambda x: koleo_loss(x, args.koleo_group))(f)

    @jax.jit
    def objective(sg, sl, t, ps, pt, m, f, c):
        _, weights = masked_token_indices(m, bound)

        def total(sg, sl, ps, f):
            dino_targets = centering.softmax_center_targets(t, c, 0.07)
            ibot_targets = centering.sinkhorn_knopp(pt, 0.07, valid=weights > 0)
            return (dino_loss(sg, sl, dino_targets).total
                    + ibot_loss(ps, ibot_targets, weights, m.shape[0])
                    + 0.1 * 2 * koleo_loss(f, args.koleo_group))

        value, grads = jax.value_and_grad(total, (0, 1, 2, 3))(sg, sl, ps, f)
        return value, grads, centering.update_center(c, t)

    result = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "batch": b, "prototypes": k, "local_crops": n_local, "embed_dim": d,
        "ibot_buffer": bound, "ibot_masked_tokens": int(masks.sum()),
        "ms": {
            "sinkhorn_log_domain": time_ms(sinkhorn_log, teacher_logits, repeats=args.repeats),
            "sinkhorn_naive": time_ms(sinkhorn_naive, teacher_logits, repeats=args.repeats),
            "dino": time_ms(dino, student_global, student_local, teacher_logits,
                            repeats=args.repeats),
            "ibot": time_ms(ibot, patch_student, patch_teacher, masks, repeats=args.repeats),
            "koleo": time_ms(koleo, features, repeats=args.repeats),
            "objective": time_ms(objective, student_global, student_local, teacher_logits,
                                 patch_student, patch_teacher, masks, features, center,
                                 repeats=args.repeats),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
