"""Write tests/fixtures/dinov3_step_losses.npz from Meta's own DINOv3 train-step loss code.

    python tools/make_dinov3_step_losses_fixture.py /path/to/dinov3-checkout

Runs DINOv3's ``SSLMetaArch.forward_backward`` (``dinov3/train/ssl_meta_arch.py``), built by its
own ``__init__`` from DINOv3's default config, on a batch from its own collate function
(``dinov3/data/collate.py`` with its ``MaskingGenerator``), so the whole loss path is Meta's:
teacher heads and Sinkhorn-Knopp centering of the CLS and masked-patch targets
(``get_teacher_output``), student heads (``get_student_output``), and ``compute_losses``: DINO
on global crops (cross-view pairs, ``global_ignore_diagonal``), DINO on local crops, the
global/local scales, iBOT on the masked tokens with ``masks_weight``, KoLeo on each global
crop's backbone CLS with ``koleo_scale``, Gram anchoring, and the backward pass.

Only the backbones are stood in for: a module returning fixed features (parameters, so the
backward pass gives their gradients) replaces the student and teacher ViTs, so the fixture
needs no image and its test no ViT. The heads are DINOv3's ``DINOHead`` with small dims and
scaled weights (logits of order 1, not the near-uniform ones of a fresh init). Three cases:
no Gram loss, and Gram anchoring at the image and at the batch level (``gram.ema_teacher``,
so the EMA teacher's patch features are the Gram targets and no Gram backbone is needed; the
composition is the same). And the Gram-at-batch-level case once more on two processes (a
gloo group, three samples each), as DINOv3 runs on GPUs: its Sinkhorn-Knopp sums and iBOT token
count are all-reduced over the ranks, while KoLeo and the batch-level Gram matrix stay within
each rank's samples; the mean of the ranks' losses is the objective that data-parallel
gradient averaging minimises.

Stored: the features, head weights, masks and teacher temperature (the inputs); the heads'
logits and centred targets Meta computes; per case the total loss, each term, and the
gradients of the total with respect to the student's logits (stored once, under ``base``: Gram
does not reach them), the KoLeo and Gram inputs and the backbone features; per rank, its
inputs, targets, loss, terms and feature gradients (``ranks/<r>/...``). Flat arrays are
crop-major, as DINOv3 collates them: ``[n_crops·B, ...]``.

To run Meta's GPU code on a CPU: ``torch.Tensor.cuda`` is made the identity (``forward_backward``
moves the batch to the GPU), a gloo process group is started even for one process (iBOT's
Sinkhorn-Knopp all-reduces its token count unconditionally), and ``TORCH_COMPILE_DISABLE`` keeps the
``SinkhornKnoppTeacher`` module that ``iBOTPatchLoss`` compiles eager (the same arithmetic).
``termcolor`` (DINOv3's log colours) is stubbed when not installed.
"""

import copy
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dinov3_checkout import import_dinov3  # noqa: E402

B, N_LOCAL, GRID, DIM, TEACHER_TEMP = 4, 2, (4, 4), 8, 0.06
HEAD = {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 8, "head_nlayers": 3}
GRAM = {"use_loss": True, "ema_teacher": True, "rep_update": False, "it_load_ema_teacher": 0,
        "loss_weight": 1.5}
CASES = {
    "base": {},
    "gram_image": {"gram": {**GRAM, "img_level": True}},
    "gram_batch": {"gram": {**GRAM, "img_level": False}},
}
# The multi-GPU case: RANKS processes of B_RANK samples each, on this case's settings.
RANKS, B_RANK, TWO_RANKS_CASE = 2, 3, "gram_batch"
# Gradients with respect to the heads' logits: stored once, for "base" (the same in every case)
LOGIT_GRADS = ("grad/global_cls_after_head", "grad/local_cls_after_head",
               "grad/masked_patch_after_head")
TERMS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "gram_loss")


class FixedBackbone(nn.Module):
    """Stands in for the ViT: the same features whatever the images, as DINOv3's output dict."""

    def __init__(self, global_cls, global_patch, local_cls=None):
        super().__init__()
        self.global_cls = nn.Parameter(global_cls)
        self.global_patch = nn.Parameter(global_patch)
        self.local_cls = None if local_cls is None else nn.Parameter(local_cls)

    @staticmethod
    def _out(cls, patch):
        return {"x_norm_clstoken": cls, "x_storage_tokens": cls.new_zeros(len(cls), 4, cls.shape[-1]),
                "x_norm_patchtokens": patch}

    def forward(self, x, masks=None, is_training=True):
        del masks, is_training
        if isinstance(x, list):  # student: [global crops, local crops]
            local_patch = self.local_cls.new_zeros(len(self.local_cls), 1, self.local_cls.shape[-1])
            return [self._out(self.global_cls, self.global_patch),
                    self._out(self.local_cls, local_patch)]
        return self._out(self.global_cls, self.global_patch)


def make_heads(head_module, seed: int):
    """Student and teacher (a perturbed copy, as an EMA would be) DINO and iBOT heads."""
    torch.manual_seed(seed)
    heads = {}
    for name in ("dino_head", "ibot_head"):
        head = head_module.DINOHead(in_dim=DIM, out_dim=HEAD["head_n_prototypes"],
                                    hidden_dim=HEAD["head_hidden_dim"],
                                    bottleneck_dim=HEAD["head_bottleneck_dim"],
                                    nlayers=HEAD["head_nlayers"])
        with torch.no_grad():
            for key, p in head.named_parameters():
                p.copy_(torch.randn_like(p) * (0.4 if key.startswith("mlp") else 0.5))
        teacher = copy.deepcopy(head)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.1 * torch.randn_like(p))
        heads[("student", name)], heads[("teacher", name)] = head, teacher
    return heads


def make_batch(collate, masking, b: int, seed: int):
    """DINOv3's collate on b samples of 2 global and N_LOCAL local (1-pixel) crops."""
    random.seed(seed)
    np.random.seed(seed)
    n_tokens = GRID[0] * GRID[1]
    image = torch.zeros(3, 1, 1)
    samples = [({"global_crops": [image, image], "local_crops": [image] * N_LOCAL}, None)] * b
    generator = masking.MaskingGenerator(input_size=GRID, max_num_patches=0.5 * n_tokens)
    batch = collate.collate_data_and_cast(samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
                                          dtype=torch.float32, n_tokens=n_tokens,
                                          mask_generator=generator)
    batch["global_batch_size"] = b
    return batch


def make_features(b: int, seed: int) -> dict:
    """Backbone outputs, crop-major: the student's are the teacher's plus noise."""
    gen = torch.Generator().manual_seed(seed)
    n_patches = GRID[0] * GRID[1]
    teacher_cls = torch.randn(2 * b, DIM, generator=gen)
    teacher_patch = torch.randn(2 * b, n_patches, DIM, generator=gen)
    return {
        "teacher/cls": teacher_cls,
        "teacher/patch": teacher_patch,
        "student/global_cls": teacher_cls + 0.7 * torch.randn(teacher_cls.shape, generator=gen),
        "student/global_patch": teacher_patch + 0.7 * torch.randn(teacher_patch.shape, generator=gen),
        "student/local_cls": (teacher_cls.repeat(N_LOCAL // 2, 1)
                              + torch.randn(N_LOCAL * b, DIM, generator=gen)),
    }


def case_config(config_module, overrides: dict):
    from omegaconf import OmegaConf

    return OmegaConf.merge(config_module.get_default_config(),
                           {"student": {"arch": "vit_small"}, "dino": HEAD, "ibot": HEAD,
                            "crops": {"local_crops_number": N_LOCAL}}, overrides)


def run_case(arch_module, cfg, heads, features, batch):
    """``forward_backward`` of an ``SSLMetaArch`` on fixed features; what its methods saw."""
    model = arch_module.SSLMetaArch(cfg)
    model.student["backbone"] = FixedBackbone(features["student/global_cls"].clone(),
                                              features["student/global_patch"].clone(),
                                              features["student/local_cls"].clone())
    model.teacher["backbone"] = FixedBackbone(features["teacher/cls"], features["teacher/patch"])
    for (net, name), head in heads.items():
        getattr(model, net)[name] = copy.deepcopy(head)
    model.teacher.requires_grad_(False)
    model.dino_loss.init_weights()
    model.ibot_patch_loss.init_weights()
    seen = {}

    def teacher_output(*args, **kwargs):
        seen["teacher"] = arch_module.SSLMetaArch.get_teacher_output(model, *args, **kwargs)
        return seen["teacher"]

    def student_output(*args, **kwargs):
        global_out, local_out = arch_module.SSLMetaArch.get_student_output(model, *args, **kwargs)
        for out in (global_out, local_out):
            for value in out.values():
                if value.requires_grad:
                    value.retain_grad()
        seen["student"] = global_out, local_out
        return global_out, local_out

    model.get_teacher_output, model.get_student_output = teacher_output, student_output
    batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss, metrics = model.forward_backward(batch, teacher_temp=TEACHER_TEMP, iteration=0)
    return model, loss, metrics, seen


def case_arrays(model, cfg, loss, metrics, seen) -> dict:
    """A case's config, loss, terms and gradients (keys without the case prefix)."""
    student_global, student_local = seen["student"]
    config = {
        "dino_loss_weight": model.dino_loss_weight, "ibot_loss_weight": model.ibot_loss_weight,
        "koleo_loss_weight": model.dino_koleo_loss_weight,
        "global_ignore_diagonal": model.dino_global_ignore_diagonal,
        "dino_student_temp": model.dino_loss.student_temp,
        "ibot_student_temp": model.ibot_patch_loss.student_temp,
        "n_local_crops": model.n_local_crops, "gram_use_loss": model.gram_use_loss,
        "gram_loss_weight": getattr(model, "gram_loss_weight", 0.0),
        "gram_img_level": getattr(model, "gram_img_level", None),
        "gram_normalized": bool(cfg.gram.normalized), "gram_remove_neg": bool(cfg.gram.remove_neg),
    }
    arrays = {"config": np.array(json.dumps(config)), "loss": np.array(loss.item(), np.float64)}
    for term in TERMS:
        if term in metrics:
            arrays[term] = np.array(float(metrics[term].detach()), np.float64)
    grads = {
        "global_cls_after_head": student_global["cls_after_head"],
        "local_cls_after_head": student_local["cls_after_head"],
        "masked_patch_after_head": student_global["masked_patch_after_head"],
        "cls_pre_head": student_global["cls_pre_head"],  # KoLeo's input only
        "patch_pre_head": student_global["patch_pre_head"],  # Gram's input only
        "global_cls": model.student["backbone"].global_cls,  # through the heads too
        "global_patch": model.student["backbone"].global_patch,
        "local_cls": model.student["backbone"].local_cls,
    }
    for key, tensor in grads.items():
        if tensor.grad is not None:
            arrays[f"grad/{key}"] = tensor.grad.numpy()
    print({k: round(float(metrics[k].detach()), 5) for k in TERMS if k in metrics},
          "total", round(loss.item(), 5))
    return arrays


def start(dinov3_root: str, store: str, rank: int, world_size: int):
    modules = import_dinov3(dinov3_root, "configs.config", "train.ssl_meta_arch", "layers.dino_head",
                            "data.collate", "data.masking")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=world_size)
    return modules


def rank_worker(rank: int, dinov3_root: str, store: str, out_dir: str) -> None:
    """One of RANKS processes: its own samples, collate and features; DINOv3's all-reduces
    (Sinkhorn-Knopp sums, iBOT token count) span the group, KoLeo and Gram stay per rank."""
    config_module, arch_module, head_module, collate, masking = start(dinov3_root, store, rank,
                                                                      RANKS)
    batch = make_batch(collate, masking, B_RANK, seed=10 + rank)
    features = make_features(B_RANK, seed=20 + rank)
    heads = make_heads(head_module, seed=2)
    cfg = case_config(config_module, CASES[TWO_RANKS_CASE])
    model, loss, metrics, seen = run_case(arch_module, cfg, heads, features, batch)
    arrays = {k: v.numpy() for k, v in features.items()}
    arrays.update({k: v for k, v in case_arrays(model, cfg, loss, metrics, seen).items()
                   if k not in LOGIT_GRADS})
    arrays["masks"] = batch["collated_masks"].numpy()
    arrays["teacher/cls_centered"] = seen["teacher"]["cls_centered"].numpy()
    np.savez(Path(out_dir) / f"rank{rank}.npz", **arrays)
    torch.distributed.destroy_process_group()


def main(dinov3_root: str, out: str = "tests/fixtures/dinov3_step_losses.npz") -> None:
    config_module, arch_module, head_module, collate, masking = start(
        dinov3_root, tempfile.mkdtemp() + "/pg", 0, 1)
    batch = make_batch(collate, masking, B, seed=0)
    features = make_features(B, seed=1)
    heads = make_heads(head_module, seed=2)

    arrays = {k: v.numpy() for k, v in features.items()}
    arrays.update({
        "teacher_temp": np.array(TEACHER_TEMP, np.float32),
        "masks": batch["collated_masks"].numpy(),
        "mask_indices": batch["mask_indices_list"].numpy(),
        "masks_weight": batch["masks_weight"].numpy(),
    })
    for (net, name), head in heads.items():
        for key, value in head.state_dict().items():
            arrays[f"{net}/{name}/{key}"] = value.numpy()

    for case, overrides in CASES.items():
        cfg = case_config(config_module, overrides)
        print(case, end=": ")
        model, loss, metrics, seen = run_case(arch_module, cfg, heads, features, batch)
        teacher, (student_global, student_local) = seen["teacher"], seen["student"]
        with torch.no_grad():  # get_teacher_output keeps only the centred iBOT targets
            masked = features["teacher/patch"].flatten(0, 1)[batch["mask_indices_list"]]
            teacher_masked = model.teacher["ibot_head"](masked)
        outputs = {
            "teacher/cls_after_head": teacher["cls_after_head"],
            "teacher/masked_patch_after_head": teacher_masked,
            "teacher/cls_centered": teacher["cls_centered"],
            "teacher/masked_patch_centered": teacher["masked_patch_centered"],
            "student/global_cls_after_head": student_global["cls_after_head"],
            "student/local_cls_after_head": student_local["cls_after_head"],
            "student/masked_patch_after_head": student_global["masked_patch_after_head"],
        }
        for key, value in outputs.items():
            value = value.detach().numpy()
            assert key not in arrays or np.array_equal(arrays[key], value), key
            arrays[key] = value
        for key, value in case_arrays(model, cfg, loss, metrics, seen).items():
            if key in LOGIT_GRADS and case != "base":  # Gram does not reach the logits
                assert np.array_equal(value, arrays[f"base/{key}"]), (case, key)
                continue
            arrays[f"{case}/{key}"] = value
    torch.distributed.destroy_process_group()

    # The same step on RANKS processes (its own process group), as DINOv3 runs on GPUs.
    work = tempfile.mkdtemp()
    print(f"{RANKS} ranks, {TWO_RANKS_CASE}:")
    torch.multiprocessing.spawn(rank_worker, args=(dinov3_root, f"{work}/pg", work), nprocs=RANKS)
    for rank in range(RANKS):
        with np.load(Path(work) / f"rank{rank}.npz") as f:
            arrays.update({f"ranks/{rank}/{k}": f[k] for k in f.files})

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
