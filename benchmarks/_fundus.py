"""A real-size synthetic fundus photograph for the input benchmarks: `fundus(rng)` -> uint8 (2136, 3216, 3).

What makes a real APTOS PNG cost what it costs (size on disk, decode, compressibility of a small copy): a black
surround, a bright disc clipped at the top and bottom, the red-orange fundus shading darker towards the rim
(vignetting), low-frequency mottling, a bright optic disc, a darker macula, branching vessels, and sensor noise
that is slightly correlated between neighbouring pixels. Saved as PNG (Pillow's default level 6), an image is
4-6 MB, in the range of real 3216 x 2136 APTOS files (the whole train set is 8.6 GB for 3,662 mixed-size images).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HEIGHT, WIDTH = 2136, 3216


def _field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1]: Gaussian values on a coarse grid, upsampled bicubically."""
    coarse = rng.normal(0, 1, (max(2, cells * h // w), cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.Resampling.BICUBIC)) / 2


def _vessels(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """A float mask in [0, 1] of branching vessels leaving the optic disc at (cx, cy)."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    stack = [(cx, cy, rng.uniform(0, 2 * np.pi), 22.0, 0) for _ in range(6)]
    while stack:
        x, y, angle, width, depth = stack.pop()
        for _ in range(int(rng.integers(8, 16))):
            angle += rng.normal(0, 0.18)
            step = radius * 0.035
            nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
            draw.line((x, y, nx, ny), fill=255, width=max(2, int(width)))
            x, y = nx, ny
        if depth < 4 and width > 4:
            for turn in (-0.5, 0.5):
                stack.append((x, y, angle + turn + rng.normal(0, 0.2), width * 0.7, depth + 1))
    mask = mask.filter(ImageFilter.GaussianBlur(2))
    return np.asarray(mask, np.float32) / 255


def fundus(rng: np.random.Generator, h: int = HEIGHT, w: int = WIDTH) -> np.ndarray:
    """A synthetic fundus photograph, uint8 (h, w, 3) (see the module docstring)."""
    cy, cx = h / 2 + rng.uniform(-0.02, 0.02) * h, w / 2 + rng.uniform(-0.02, 0.02) * w
    radius = 0.6 * h * rng.uniform(0.95, 1.05)  # wider than the frame is tall: clipped at the top and bottom
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    inside = np.clip((1 - r) * radius / 6, 0, 1)  # a soft rim a few pixels wide
    shade = (1 - 0.55 * r ** 2) * (1 + 0.12 * _field(rng, h, w, 12)) + 0.04 * _field(rng, h, w, 80)
    side = rng.choice([-1, 1])
    dx, dy = cx + side * 0.38 * radius, cy + rng.uniform(-0.05, 0.05) * radius
    disc = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * (0.07 * radius) ** 2))
    macula = np.exp(-((xx - (cx - side * 0.05 * radius)) ** 2 + (yy - cy) ** 2) / (2 * (0.1 * radius) ** 2))
    vessels = _vessels(rng, h, w, dx, dy, radius)
    colour = np.array([190, 95, 40], np.float32) * rng.uniform(0.85, 1.1, 3)
    img = shade[..., None] * colour
    img = img * (1 - 0.35 * macula[..., None]) + disc[..., None] * np.array([60, 90, 60], np.float32)
    img = img * (1 - 0.45 * vessels[..., None] * np.array([0.6, 1.0, 1.0], np.float32))
    noise = rng.normal(0, 1.0, (h, w, 3)).astype(np.float32)
    noise += 0.6 * np.roll(noise, 1, axis=1)  # neighbouring pixels correlated, as demosaicing leaves them
    img = img * inside[..., None] + noise * (0.25 + 0.75 * inside[..., None])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
