"""A small, deterministic ImageFolder dataset of procedurally drawn shapes and textures (no downloads).

Ten classes; each image (64-96 px a side) has a random background colour with noise and one random
instance of its class: position, size, rotation and colours vary. Generated on first use into
``root/train`` and ``root/val``; a marker file tells a complete dataset from an interrupted one.
"""
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'stripes', 'checkerboard', 'dots', 'frame')
TRAIN_PER_CLASS = 100
VAL_PER_CLASS = 20
_COMPLETE_MARKER = '.complete'


def _colour(rng: np.random.RandomState) -> tuple:
    return tuple(int(c) for c in rng.randint(0, 256, size=3))


def _contrasting(rng: np.random.RandomState, background: tuple) -> tuple:
    while True:
        colour = _colour(rng)
        if sum(abs(a - b) for a, b in zip(colour, background)) > 180:
            return colour


def _polygon(cx: float, cy: float, radii, angle: float):
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + i * step), cy + r * math.sin(angle + i * step)) for i, r in enumerate(radii)]


def _draw(name: str, rng: np.random.RandomState) -> Image.Image:
    size = int(rng.randint(64, 97))
    background = _colour(rng)
    noise = rng.randint(-20, 21, size=(size, size, 3))
    canvas = np.clip(np.array(background)[None, None] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    fill = _contrasting(rng, background)
    radius = size * rng.uniform(0.25, 0.4)
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1) * size for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    width = max(2, int(radius / 4))
    if name == 'circle':
        draw.ellipse(box, fill=fill)
    elif name == 'square':
        draw.polygon(_polygon(cx, cy, [radius] * 4, angle), fill=fill)
    elif name == 'triangle':
        draw.polygon(_polygon(cx, cy, [radius] * 3, angle), fill=fill)
    elif name == 'star':
        draw.polygon(_polygon(cx, cy, [radius, radius * 0.4] * 5, angle), fill=fill)
    elif name == 'cross':
        for direction in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(direction), radius * math.sin(direction)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=width)
    elif name == 'ring':
        draw.ellipse(box, outline=fill, width=width)
    elif name == 'frame':
        draw.polygon(_polygon(cx, cy, [radius] * 4, angle), outline=fill, width=width)
    elif name == 'stripes':
        period = rng.randint(6, 12)
        dx, dy = math.cos(angle), math.sin(angle)
        for offset in range(-2 * size, 2 * size, period):
            px, py = size / 2 + offset * -dy, size / 2 + offset * dx
            draw.line([(px - 2 * size * dx, py - 2 * size * dy), (px + 2 * size * dx, py + 2 * size * dy)],
                      fill=fill, width=period // 2)
    elif name == 'checkerboard':
        cell = rng.randint(6, 14)
        for row in range(0, size, cell):
            for col in range(0, size, cell):
                if (row // cell + col // cell) % 2 == 0:
                    draw.rectangle((col, row, col + cell - 1, row + cell - 1), fill=fill)
    elif name == 'dots':
        for _ in range(rng.randint(15, 30)):
            x, y = rng.uniform(0, size, size=2)
            r = rng.uniform(1.5, 3.5)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    else:
        raise ValueError(f'unknown class {name!r}')
    return image


def generate(root: str, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS):
    """Write the dataset into ``root`` (train/ and val/, one folder per class, PNG files)."""
    rng = np.random.RandomState(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for name in CLASSES:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                _draw(name, rng).save(os.path.join(folder, f'{name}_{i:04d}.png'))


def ensure_synthetic_shapes(root: str, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS,
                            val_per_class: int = VAL_PER_CLASS):
    """Generate the dataset into ``root`` unless a complete copy is already there (a smaller one with fewer images
    per class)."""
    if os.path.isfile(os.path.join(root, _COMPLETE_MARKER)):
        return
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(f'{root} exists and is not a complete synthetic_shapes dataset: '
                              'remove it or choose another data path')
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.synthetic_shapes_', dir=parent)
    try:
        generate(staging, seed, train_per_class, val_per_class)
        open(os.path.join(staging, _COMPLETE_MARKER), 'w').close()
        if os.path.exists(root):
            os.rmdir(root)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
