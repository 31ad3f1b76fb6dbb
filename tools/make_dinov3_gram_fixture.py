"""Write tests/fixtures/dinov3_gram.npz from Meta's own DINOv3 Gram anchoring loss.

    python tools/make_dinov3_gram_fixture.py /path/to/dinov3-checkout

Runs DINOv3's ``GramLoss`` (``dinov3/loss/gram_loss.py``) on small random patch features for
each way of treating negative similarities (kept, removed from both Gram matrices, removed
from the teacher's only) at the image and the batch level, and stores the inputs, losses and
the gradients with respect to the student's features, so the tests can compare
``braindino_jax.ssl.gram`` with the reference without needing the checkout.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

# negatives mode -> GramLoss(remove_neg, remove_only_teacher_neg)
MODES = {"keep": (False, False), "remove": (True, False), "remove_teacher": (False, True)}


def main(dinov3_root: str, out: str = "tests/fixtures/dinov3_gram.npz") -> None:
    # Load the module by file: dinov3.loss's __init__ pulls in the other losses.
    path = Path(dinov3_root) / "dinov3" / "loss" / "gram_loss.py"
    spec = importlib.util.spec_from_file_location("dinov3_gram_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    rng = np.random.default_rng(0)
    student = rng.normal(size=(4, 8, 6)).astype(np.float32)
    teacher = (0.5 * student + rng.normal(size=student.shape)).astype(np.float32)
    arrays = {"student": student, "teacher": teacher}
    for name, (remove_neg, remove_only_teacher_neg) in MODES.items():
        loss_fn = module.GramLoss(apply_norm=True, remove_neg=remove_neg,
                                  remove_only_teacher_neg=remove_only_teacher_neg)
        for img_level in (True, False):
            s = torch.from_numpy(student).requires_grad_(True)
            loss = loss_fn(s, torch.from_numpy(teacher), img_level=img_level)
            loss.backward()
            key = f"{name}/{'image' if img_level else 'batch'}"
            arrays[f"{key}/loss"] = np.array(loss.item(), np.float64)
            arrays[f"{key}/grad"] = s.grad.numpy()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
