"""Write tests/fixtures/dinov3_masks.npz from Meta's own DINOv3 iBOT masking code.

    python tools/make_dinov3_masks_fixture.py /path/to/dinov3-checkout

Runs DINOv3's ``MaskingGenerator`` (``dinov3/data/masking.py``, built as ``train.py`` builds
it: 14 x 14 patches, at most half of them per rectangle) through its
``collate_data_and_cast`` (``dinov3/data/collate.py``: mask probability 0.5, ratios
[0.1, 0.5]) for many batches of global crops, and stores the masks (bit-packed), so the tests
can compare ``braindino_jax.data.masking`` with the reference without needing the checkout.
"""

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import torch

GRID = (14, 14)
BATCHES = {16: 60, 10: 20}  # global crops per batch (2 x images): batches collated


def _load(root: Path, name: str):
    # Load the module by file: dinov3.data's __init__ pulls in the datasets and loaders.
    spec = importlib.util.spec_from_file_location(f"dinov3_{name}", root / "dinov3" / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(dinov3_root: str, out: str = "tests/fixtures/dinov3_masks.npz") -> None:
    root = Path(dinov3_root)
    masking, collate = _load(root, "masking"), _load(root, "collate")
    n_tokens = GRID[0] * GRID[1]
    generator = masking.MaskingGenerator(input_size=GRID, max_num_patches=0.5 * n_tokens)
    random.seed(0)
    np.random.seed(0)
    image = torch.zeros(1, 1, 1)
    arrays = {}
    for crops, n_batches in BATCHES.items():
        samples = [({"global_crops": [image, image], "local_crops": [image]}, None)] * (crops // 2)
        masks = []
        for _ in range(n_batches):
            batch = collate.collate_data_and_cast(
                samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32,
                n_tokens=n_tokens, mask_generator=generator)
            masks.append(batch["collated_masks"].numpy())
            assert batch["n_masked_patches"].item() == batch["upperbound"]
        masks = np.stack(masks)  # [batches, crops, N]
        arrays[f"b{crops}/masks"] = np.packbits(masks, axis=-1)
        arrays[f"b{crops}/upperbound"] = np.array(batch["upperbound"])
    arrays["grid"] = np.array(GRID)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
