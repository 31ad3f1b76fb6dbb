"""Pictures of frozen features, written as PNGs.

- PCA of patch features → RGB over the slice (foreground patches only): the first three
  principal components of the foreground patches of all shown slices, each stretched between
  its 1st and 99th percentile. DINO's signature picture: parts of the anatomy get one colour.
- Reference-patch similarity: the cosine similarity of one patch's feature to every patch of
  the same and other slices (and volumes).
- t-SNE of volume features, coloured by label.
- A segmentation probe's prediction next to the truth.
PCA and t-SNE come from scikit-learn, the plots from matplotlib.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

_EXACT_TSNE_MAX = 300


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def patch_foreground(pixels: np.ndarray, grid: int, min_fraction: float = 0.5) -> np.ndarray:
    """[S, grid, grid] bool: patches whose area is at least ``min_fraction`` brain."""
    fg = (pixels > 0).astype(np.float32)
    size = fg.shape[-1]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    fraction = np.add.reduceat(np.add.reduceat(fg, edges[:-1], axis=1), edges[:-1], axis=2)
    area = np.outer(np.diff(edges), np.diff(edges))
    return fraction / area >= min_fraction


def pca_rgb(patches: np.ndarray, foreground: np.ndarray, seed: int = 0) -> np.ndarray:
    """Patch features [S, h, w, D] → RGB [S, h, w, 3] in [0, 1]; background patches black."""
    values = patches[foreground].astype(np.float64)
    rgb = np.zeros(patches.shape[:3] + (3,))
    if len(values) < 3:
        return rgb
    components = PCA(n_components=3, random_state=seed).fit_transform(values)
    lo, hi = np.percentile(components, [1, 99], axis=0)
    rgb[foreground] = np.clip((components - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return rgb


def cosine_similarity_maps(patches: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of every patch [..., D] to the ``reference`` feature [D]."""
    flat = patches.astype(np.float64)
    norms = np.linalg.norm(flat, axis=-1) * np.linalg.norm(reference)
    return (flat @ reference.astype(np.float64)) / np.maximum(norms, 1e-12)


def central_patch(foreground: np.ndarray) -> tuple[int, int]:
    """The foreground patch closest to the foreground's centroid (a slice's [h, w] mask)."""
    rows, cols = np.nonzero(foreground)
    if rows.size == 0:
        return foreground.shape[0] // 2, foreground.shape[1] // 2
    centre = np.array([rows.mean(), cols.mean()])
    nearest = np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (encoder specs can be long)."""
    width = max(30, int(fig.get_figwidth() * 13))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), fontsize=8)


def _show(ax, image, title: str | None = None, **kwargs) -> None:
    ax.imshow(image, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _upsample(grid_image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a [h, w, ...] patch grid to [size, size, ...]."""
    index = np.minimum((np.arange(size) * grid_image.shape[0]) // size, grid_image.shape[0] - 1)
    return grid_image[index][:, index]


def plot_pca(pixels: np.ndarray, patches: np.ndarray, path: str | os.PathLike, title: str,
             names: list[str] | None = None) -> None:
    """Each slice [S, size, size] above its PCA-RGB patch map."""
    plt = _pyplot()
    foreground = patch_foreground(pixels, patches.shape[1])
    rgb = pca_rgb(patches, foreground)
    n = len(pixels)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 3.9), dpi=120, squeeze=False)
    for i in range(n):
        _show(axes[0, i], pixels[i], names[i] if names else None, cmap="gray")
        _show(axes[1, i], _upsample(rgb[i], pixels.shape[-1]))
    _suptitle(fig, f"{title}\nPCA of foreground patch features (components 1-3 → RGB)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_similarity(pixels: np.ndarray, patches: np.ndarray, reference: tuple[int, int, int],
                    path: str | os.PathLike, title: str, names: list[str] | None = None) -> None:
    """Cosine similarity to the patch ``reference`` = (slice, row, col), on every slice."""
    plt = _pyplot()
    s, r, c = reference
    sims = cosine_similarity_maps(patches, patches[s, r, c])
    foreground = patch_foreground(pixels, patches.shape[1])
    n, size, grid = len(pixels), pixels.shape[-1], patches.shape[1]
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4.1), dpi=120, squeeze=False)
    for i in range(n):
        _show(axes[0, i], pixels[i], names[i] if names else None, cmap="gray")
        heat = np.where(foreground[i], sims[i], np.nan)
        image = axes[1, i].imshow(_upsample(heat, size), cmap="magma", vmin=-1, vmax=1)
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
        if i == s:
            scale = size / grid
            for ax in axes[:, i]:
                ax.add_patch(plt.Rectangle((c * scale, r * scale), scale, scale, fill=False, color="cyan", lw=1))
    fig.colorbar(image, ax=axes[1, :].tolist(), shrink=0.8, label="cosine similarity")
    _suptitle(fig, f"{title}\nsimilarity to the boxed patch (slice {s}, row {r}, col {c})")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_tsne(features: np.ndarray, labels: np.ndarray, path: str | os.PathLike, title: str,
              class_names: tuple[str, ...] = (), seed: int = 0) -> bool:
    """t-SNE of volume features coloured by class (or by value for a continuous target).

    Returns False (and writes nothing) with fewer than 5 volumes.
    """
    if len(features) < 5:
        return False
    plt = _pyplot()
    perplexity = float(min(30.0, (len(features) - 1) / 3))
    method = "exact" if len(features) <= _EXACT_TSNE_MAX else "barnes_hut"  # exact is faster when small
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method,
                    random_state=seed).fit_transform(np.asarray(features, np.float64))
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    if class_names:
        for k, name in enumerate(class_names):
            chosen = labels == k
            ax.scatter(embedded[chosen, 0], embedded[chosen, 1], s=18, label=name)
        ax.legend(fontsize=7)
    else:
        points = ax.scatter(embedded[:, 0], embedded[:, 1], s=18, c=labels, cmap="viridis")
        fig.colorbar(points, ax=ax)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(textwrap.fill(title, 70) + f"\nt-SNE of volume features (perplexity {perplexity:.0f})",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_segmentation(pixels: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
                      path: str | os.PathLike, title: str, class_names: tuple[str, ...]) -> None:
    """Slices [S, size, size] with the true and the predicted class maps."""
    plt = _pyplot()
    n, k = len(pixels), len(class_names)
    fig, axes = plt.subplots(3, n, figsize=(1.8 * n, 5.6), dpi=120, squeeze=False)
    for i in range(n):
        _show(axes[0, i], pixels[i], "image" if i == 0 else None, cmap="gray")
        _show(axes[1, i], truth[i], "truth" if i == 0 else None, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        _show(axes[2, i], prediction[i], "prediction" if i == 0 else None, cmap="tab10", vmin=0, vmax=9,
              interpolation="nearest")
    colours = plt.get_cmap("tab10")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(j)) for j in range(min(k, 10))]
    fig.legend(handles, class_names[:10], loc="lower center", ncol=min(k, 5), fontsize=7)
    _suptitle(fig, title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
