"""ImageNet-like JPEGs written offline, for the host-input benchmark (``--synthesize``).

Decoding speed depends on the content (entropy coding works harder on detail) and on the size,
so flat noise or one repeated picture would measure the wrong thing. Each image here is a random
crop of one of the photographs shipped inside scikit-image's wheel (``skimage/data``: an
astronaut, a cat, coffee, a rocket, the Hubble deep field, a retina, motorcycles, tissue; grass,
gravel, brick and other grey pictures tinted), resized to an ImageNet-like size (mostly 500 px on
the long side, 4:3 or 3:2, with a spread from 300 to 800 px), colour-scaled, with mild sensor
noise and saved at JPEG quality 90 with 4:2:0 chroma (PIL's default). ImageNet's training JPEGs
are about 500x375 and ~110 KB on average; the summary says what these came to.

The layout is ``ROOT/train/<class>/<name>.JPEG``: torchvision's ``ImageFolder`` and moco_jax's
folder dataset (``--config.dataset.name=folder:ROOT``) read it as it is.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

# Pictures of skimage/data (file names): colour photographs, then grey ones (tinted when used).
COLOUR = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
GREY = ("grass.png", "gravel.png", "brick.png", "camera.png", "coins.png", "moon.png")
CLASSES = 10
QUALITY = 90
# (long side, short side / long side) draws: ImageNet is mostly 500 px on the long side.
ASPECTS = (3 / 4, 3 / 4, 3 / 4, 2 / 3, 2 / 3, 4 / 5, 1.0, 9 / 16)


class SynthesisError(RuntimeError):
    """The source pictures are not installed (scikit-image is an optional extra)."""


def source_pictures() -> list[np.ndarray]:
    """The source photographs as RGB uint8 arrays (grey ones as three equal channels)."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SynthesisError(
            "--synthesize needs scikit-image's bundled photographs: pip install scikit-image"
        )
    directory = os.path.join(spec.submodule_search_locations[0], "data")
    pictures = []
    for name in COLOUR + GREY:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            pictures.append(np.asarray(Image.open(path).convert("RGB")))
    if not pictures:
        raise SynthesisError(f"no source pictures in {directory}")
    return pictures


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of one image: long side 500 px 60% of the time, else 300-800 px."""
    long = 500 if rng.random() < 0.6 else int(rng.integers(300, 801))
    short = max(64, int(round(long * ASPECTS[rng.integers(len(ASPECTS))])))
    return (short, long) if rng.random() < 0.75 else (long, short)  # mostly landscape


def synthetic_image(rng: np.random.Generator, pictures: list[np.ndarray]) -> np.ndarray:
    """One ImageNet-like RGB uint8 image (see the module docstring)."""
    from PIL import Image

    source = pictures[rng.integers(len(pictures))]
    height, width = _size(rng)
    src_h, src_w = source.shape[:2]
    # A crop of the source near the target's scale (the sources are 300-1400 px: little
    # upscaling, which would smooth the detail away), resized to the target size.
    crop_h = int(rng.uniform(min(src_h, 0.8 * height), src_h))
    crop_w = min(src_w, max(16, int(crop_h * width / height * rng.uniform(0.8, 1.25))))
    top = int(rng.integers(0, src_h - crop_h + 1))
    left = int(rng.integers(0, src_w - crop_w + 1))
    crop = Image.fromarray(source[top : top + crop_h, left : left + crop_w])
    image = np.asarray(crop.resize((width, height), Image.BICUBIC), np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image * rng.uniform(0.75, 1.25, 3) + rng.normal(0, rng.uniform(2, 5), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def synthesize(root: str, count: int, seed: int = 0) -> dict:
    """Write ``count`` JPEGs under ``root/train/<class>/``; a summary of what was written."""
    from PIL import Image

    pictures = source_pictures()
    rng = np.random.default_rng(seed)
    sizes, areas = [], []
    for index in range(count):
        directory = os.path.join(root, "train", f"class_{index % CLASSES:02d}")
        os.makedirs(directory, exist_ok=True)
        image = synthetic_image(rng, pictures)
        path = os.path.join(directory, f"img_{index:07d}.JPEG")
        Image.fromarray(image).save(path, format="JPEG", quality=QUALITY)
        sizes.append(os.path.getsize(path))
        areas.append(image.shape[0] * image.shape[1])
    return {
        "root": root,
        "images": count,
        "mean_kb": round(float(np.mean(sizes)) / 1024, 1),
        "mean_megapixels": round(float(np.mean(areas)) / 1e6, 3),
        "sources": len(pictures),
        "quality": QUALITY,
    }
