"""Scenes of the synthetic "shapes" dataset: what is in an image, and how it is drawn.

A scene is 1-3 coloured shapes, each in its own cell of a 3x3 grid, on a plain light background.
Sampling is a pure function of a string seed, so any image can be regenerated alone (and the
val/test images do not change when the train size does). Difficulty varies on purpose: a single
large shape is easy to describe; several small ones (possibly two of the same kind, which
captions then count) need more of the model.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (238, 200, 20),
    "purple": (148, 60, 189),
    "orange": (255, 127, 14),
}
# Half-extent of a shape in pixels of the 64x64 image; a grid cell is about 21 px wide, so even
# a large shape stays inside its cell and shapes never overlap.
SIZES: Dict[str, float] = {"small": 4.0, "medium": 6.5, "large": 9.5}
BACKGROUNDS: Tuple[Tuple[int, int, int], ...] = ((245, 245, 245), (232, 232, 226), (250, 244, 232))

# Grid cell (row, col) -> canonical position name, as VQA answers use it.
POSITIONS: Dict[Tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}

# Size distributions per object count: one object is usually big, three are usually small.
_SIZE_WEIGHTS = {1: (0.2, 0.35, 0.45), 2: (0.4, 0.45, 0.15), 3: (0.55, 0.4, 0.05)}
_COUNT_WEIGHTS = (0.4, 0.35, 0.25)
_DUPLICATE_PROB = 0.3


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene."""

    shape: str
    colour: str
    size: str
    cell: Tuple[int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """Objects in reading order (top to bottom, left to right) and the background colour."""

    objects: Tuple[ShapeObject, ...]
    background: Tuple[int, int, int]
    jitter: Tuple[Tuple[int, int], ...]


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """The RNG of one image; str seeds hash with SHA-512, so this is stable across runs."""
    return random.Random(f"shapes:{seed}:{split}:{index}")


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene; with some probability a shape is repeated so that counting matters."""
    count = rng.choices((1, 2, 3), weights=_COUNT_WEIGHTS)[0]
    cells = rng.sample(sorted(POSITIONS), count)
    objects = []
    for i, cell in enumerate(cells):
        size = rng.choices(tuple(SIZES), weights=_SIZE_WEIGHTS[count])[0]
        if i > 0 and rng.random() < _DUPLICATE_PROB:
            shape, colour = objects[-1].shape, objects[-1].colour
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        objects.append(ShapeObject(shape, colour, size, cell))
    objects.sort(key=lambda o: o.cell)
    background = rng.choice(BACKGROUNDS)
    jitter = tuple((rng.randint(-1, 1), rng.randint(-1, 1)) for _ in objects)
    return Scene(tuple(objects), background, jitter)


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene at 4x and downsample, so small shapes keep clean anti-aliased edges."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for obj, (dx, dy) in zip(scene.objects, scene.jitter):
        row, col = obj.cell
        cx = (col + 0.5) * cell + dx * SUPERSAMPLE
        cy = (row + 0.5) * cell + dy * SUPERSAMPLE
        r = SIZES[obj.size] * SUPERSAMPLE
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
