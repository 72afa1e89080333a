"""What the features mean, as pictures: a query image beside its nearest training images
(``neighbours.png``), and the features in 2-D coloured by class (``embedding.png``).

The 2-D map is t-SNE (scikit-learn's ``TSNE``, PCA initialisation, a fixed seed): it keeps each
point's near neighbours near, which is what a kNN accuracy measures, and scikit-learn is already
this project's test extra; UMAP (umap-learn) would add numba and its compile times for a picture
of the same kind. Both are optional: without scikit-learn the map is one clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moco_jax.config.checks import ConfigError

MATCH, MISS = "#2ca02c", "#d62728"  # frame colours: a neighbour of the query's class, or not
QUERY = "#1f77b4"  # the query's frame


class MissingExtra(ConfigError):
    """An optional package a picture needs is not installed (the message says what to install)."""


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[N, 2]`` t-SNE coordinates of ``features`` (rows), deterministic for a seed."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise MissingExtra("embedding.png needs scikit-learn: pip install scikit-learn") from None
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    # One thread: OpenMP's waiting threads on a busy machine made 256 points take 35 s, not 3.
    with threadpool_limits(1):
        return tsne.fit_transform(np.asarray(features, np.float64))


def _png(fig) -> bytes:
    """``fig`` as PNG bytes, closed (the caller writes them: ``storage.write_whole``)."""
    import io

    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, dpi=90, format="png")
    plt.close(fig)
    return png.getvalue()


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.uint8)


def mosaic(
    tiles: np.ndarray, frames: np.ndarray, border: int = 3, gap: int = 4, caption: int = 0
) -> np.ndarray:
    """One RGB image of ``tiles`` ``[rows, cols, h, w, c]`` (uint8), each inside a frame of
    ``border`` pixels coloured ``frames[r, c]`` (``#rrggbb``, or "" for none), ``gap`` white
    pixels apart and ``caption`` more above each row. One image instead of a grid of axes:
    matplotlib drew 108 small axes in 10 s."""
    rows, cols, h, w = tiles.shape[:4]
    cell_h, cell_w = h + 2 * border + gap + caption, w + 2 * border + gap
    canvas = np.full((rows * cell_h + gap, cols * cell_w + gap, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = gap + caption + r * cell_h, gap + c * cell_w
            if frames[r, c]:
                frame = _rgb(frames[r, c])
                canvas[top : top + h + 2 * border, left : left + w + 2 * border] = frame
            tile = tiles[r, c]
            if tile.shape[-1] == 1:
                tile = np.repeat(tile, 3, axis=-1)
            canvas[top + border : top + border + h, left + border : left + border + w] = tile
    return canvas


def draw_neighbours(
    queries: np.ndarray,
    query_labels: np.ndarray | None,
    neighbours: np.ndarray,
    neighbour_labels: np.ndarray | None,
    class_names: Sequence[str],
    title: str,
) -> bytes:
    """PNG bytes of one row per query: the query (blue frame), then its neighbours (most similar
    first). With labels each image is captioned with its class and each neighbour framed green
    (the query's class) or red (another); without labels (``None``), no captions and no frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, k = neighbours.shape[:2]
    tiles = np.concatenate([queries[:, None], neighbours], axis=1).astype(np.uint8)
    frames = np.full((rows, k + 1), "", dtype=object)
    frames[:, 0] = QUERY
    labelled = query_labels is not None and neighbour_labels is not None
    if labelled:
        same = neighbour_labels == query_labels[:, None]
        frames[:, 1:] = np.where(same, MATCH, MISS)
    h, w = tiles.shape[2:4]
    caption = max(4, h // 4) if labelled else 0  # white rows above each row for the names
    canvas = mosaic(tiles, frames, caption=caption)
    cell_h, cell_w = h + 10 + caption, w + 10  # mosaic's frame (3 a side) and gap (4)
    inches = 1.1 / cell_w  # a tile about 1.1 inches wide
    height = canvas.shape[0] * inches + 0.45
    fig = plt.figure(figsize=(canvas.shape[1] * inches, height))
    ax = fig.add_axes((0, 0, 1, 1 - 0.45 / height))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if labelled:
        for r in range(rows):
            names = [class_names[query_labels[r]]] + [class_names[x] for x in neighbour_labels[r]]
            for c, name in enumerate(names):
                ax.text(4 + c * cell_w + cell_w / 2, 4 + caption + r * cell_h - 1, name[:16],
                        ha="center", va="bottom", fontsize=6,
                        fontweight="bold" if c == 0 else "normal")  # fmt: skip
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def draw_maps(
    maps: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray | None,
    class_names: Sequence[str],
    title: str,
) -> bytes:
    """PNG bytes of, side by side, one scatter per ``(name, [N, 2] points)``, coloured by class
    with one legend (``labels`` None: one colour, no legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps) + 1.6, 5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    size = max(3.0, min(20.0, 6000 / max(len(maps[0][1]), 1)))  # dots: small when many
    for ax, (name, points) in zip(axes[0], maps, strict=True):
        if labels is None:
            ax.scatter(points[:, 0], points[:, 1], s=size, color="#1f77b4")
        else:
            for c, cls in enumerate(class_names):
                here = labels == c
                if here.any():
                    colour = cmap(c % cmap.N)
                    ax.scatter(points[here, 0], points[here, 1], s=size, color=colour, label=cls)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if labels is not None:
        axes[0, -1].legend(
            loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=4, fontsize=8, frameon=False
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
