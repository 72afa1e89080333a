"""A small folder of images (ROOT/<split>/<class>/<image>) written in a second, with bad files."""

import io
import os
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

CLASSES = ("blue", "green", "red")  # sorted: labels 0, 1, 2
COLOURS = {"red": (220, 40, 40), "green": (40, 220, 40), "blue": (40, 40, 220)}


def coloured(rng, name, height, width):
    noise = rng.normal(0, 25, (height, width, 3))
    return np.clip(np.asarray(COLOURS[name], np.float32) + noise, 0, 255).astype(np.uint8)


def encode(array, fmt, mode=None):
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_folder(root, counts=(("train", 16), ("val", 4)), seed=0):
    """``counts`` images per class and split: JPEG, every 4th a PNG, every 5th grayscale, of
    36-63 px on a side."""
    rng = np.random.default_rng(seed)
    for split, count in counts:
        for name in CLASSES:
            directory = pathlib.Path(root, split, name)
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = rng.integers(36, 64, 2)
                fmt = "PNG" if i % 4 == 3 else "JPEG"
                data = encode(coloured(rng, name, height, width), fmt, "L" if i % 5 == 4 else None)
                (directory / f"{i:03d}.{fmt.lower()}").write_bytes(data)
    return pathlib.Path(root)


def png_claiming(width, height):
    """A PNG whose header (with a valid CRC) claims ``width`` x ``height``; its pixel data is a
    few bytes: decoding it whole would need width * height * 3 bytes before noticing."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def add_bad_files(class_dir):
    """Seven bad files in ``class_dir`` (one valid JPEG among them is under a non-UTF-8 name);
    returns their count."""
    class_dir = pathlib.Path(class_dir)
    rng = np.random.default_rng(1)
    good = encode(coloured(rng, class_dir.name, 40, 40), "JPEG")
    (class_dir / "notes.jpg").write_text("not an image\n")
    (class_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (class_dir / "empty.png").write_bytes(b"")
    (class_dir / "pixel.png").write_bytes(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    (class_dir / "huge.png").write_bytes(png_claiming(20_000, 20_000))
    os.symlink("loop.jpg", class_dir / "loop.jpg")  # a link to itself
    with open(os.fsencode(class_dir) + b"/caf\xe9.jpg", "wb") as f:  # a Latin-1 name
        f.write(good)
    return 7
