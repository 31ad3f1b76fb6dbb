"""Write tests/fixtures/dinov3_schedules.npz from Meta's own DINOv3 scheduler code.

    python tools/make_dinov3_schedule_fixture.py /path/to/dinov3-checkout

Runs DINOv3's ``CosineScheduler`` (``dinov3/train/cosine_lr_scheduler.py``) and its
``build_schedulers`` recipe for the lr, weight decay, momentum, teacher temperature and
last-layer lr, for small runs, and stores their full tables so the tests can compare
``braindino_jax.train.schedules`` with the reference without needing the checkout.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np


def main(dinov3_root: str, out: str = "tests/fixtures/dinov3_schedules.npz") -> None:
    # Load the scheduler module by file: dinov3.train's __init__ pulls in the whole trainer.
    path = Path(dinov3_root) / "dinov3" / "train" / "cosine_lr_scheduler.py"
    spec = importlib.util.spec_from_file_location("dinov3_cosine_lr_scheduler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    CosineScheduler = module.CosineScheduler

    cases = {
        # name: (total, lr_warmup, temp_warmup, freeze) in iterations
        "a": (120, 30, 50, 10),
        "b": (57, 0, 1, 0),
        "c": (40, 1, 0, 40),
    }
    arrays = {}
    for name, (total, warmup, temp_warmup, freeze) in cases.items():
        lr = CosineScheduler(4e-3, 1e-6, total, warmup_iters=warmup, start_warmup_value=0)
        wd = CosineScheduler(0.04, 0.4, total)
        mom = CosineScheduler(0.992, 1.0, total)
        temp = CosineScheduler(0.07, 0.07, temp_warmup, warmup_iters=temp_warmup,
                               start_warmup_value=0.04) if temp_warmup else None
        last = CosineScheduler(4e-3, 1e-6, total, warmup_iters=warmup, start_warmup_value=0)
        last.schedule[:freeze] = 0
        steps = np.arange(total + 5)  # past the end too: the schedulers return final_value
        arrays[f"{name}/config"] = np.array([total, warmup, temp_warmup, freeze])
        arrays[f"{name}/lr"] = np.array([lr[int(s)] for s in steps])
        arrays[f"{name}/weight_decay"] = np.array([wd[int(s)] for s in steps])
        arrays[f"{name}/momentum"] = np.array([mom[int(s)] for s in steps])
        arrays[f"{name}/teacher_temp"] = np.array(
            [temp[int(s)] if temp else 0.07 for s in steps])
        arrays[f"{name}/last_layer_lr"] = np.array([last[int(s)] for s in steps])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
