"""
Synthetic H&E-like tissue: a small plan of a slide, rendered region by region at any magnification.

A slide is planned once at low resolution (a smooth random field whose positive part is the tissue, a texture
field, and a list of class structures as geometric primitives in 5X pixels) and then painted tile by tile, so a
40,000 x 40,000 slide never exists in memory. Every class uses the same palette and the same ink area (``INK_FRACTION``
of the tissue): only the shape of the sparse structures tells classes apart, so a classifier must look at the
whole slide rather than at its average colour.

Two tasks (``TASKS``):
- "subtype": every class has structures, of its own shape (like LUAD vs LUSC): shape alone tells them apart.
- "detect": class 0 is normal tissue without structures, class c has structures of shape c - 1 (like tumour vs
  normal, the standard MIL assumption: a slide is positive when some of its regions are). Easier to learn from
  scratch; the demo and the learning test use it.
- "texture": two classes with the same round nodules over ``NODULE_FRACTION`` of the tissue, in the same mean
  colour; class 1's nodules are finely textured (a 2-pixel checker at 5X), class 0's smooth. Low-level texture
  alone decides: the task where the shallow classifiers A_1 / A_2 see the evidence first.
- "fine": the texture task with its checker at the scale of one 10X pixel (2 x 2 pixels at 20X, half a 5X pixel):
  the evidence exists only above 5X. Every level is the area average of the scene (as a lower objective sees it),
  so a 5X pixel averages two cells of either sign to the smooth nodule's colour: at 5X the classes are identical.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

__all__ = ["INK", "INK_FRACTION", "MOTIFS", "NODULE", "NODULE_FRACTION", "STROMA", "TASKS", "SlidePlan", "plan_slide",
           "render_region"]

STROMA = np.array([232.0, 164.0, 200.0], dtype=np.float32)  # eosin pink
_LAVENDER = np.array([200.0, 152.0, 212.0], dtype=np.float32)  # haematoxylin-tinged stroma, mixed in by texture
INK = np.array([84.0, 38.0, 128.0], dtype=np.float32)  # the class structures: dense dark purple
_BACKGROUND = np.array([243.0, 241.0, 244.0], dtype=np.float32)  # glass
INK_FRACTION = 0.03  # share of the tissue area covered by class structures, the same for every class
_TISSUE_CELLS = 40  # tissue field nodes along the long side: a handful of blobs per slide
_TEXTURE_CELL = 3.0  # 5X pixels between texture nodes
NODULE = np.array([150.0, 104.0, 176.0], dtype=np.float32)  # the texture task's nodules: mid purple
NODULE_FRACTION = 0.12  # share of the tissue the texture task's nodules cover, in both classes
_CHECKER = 45.0  # grey levels either side of NODULE in class 1's texture: zero mean, so the mean colour is equal
_CHECKER_CELL = {"texture": 2.0, "fine": 0.5}  # side of the checker's squares in 5X pixels, per task
_DISK, _RING, _ELLIPSE = 0, 1, 2  # primitive kinds; a primitive row is (kind, y, x, a, b, angle) in 5X pixels


@dataclasses.dataclass
class SlidePlan:
    """Everything needed to paint one slide at any magnification; coordinates in pixels at 5X."""

    shape: tuple[int, int]  # the slide at 5X
    label: int
    tissue: np.ndarray  # float32 field on nodes every ``tissue_cell`` pixels; > 0 is tissue
    tissue_cell: float
    texture: np.ndarray  # float32 in [0, 1] on nodes every _TEXTURE_CELL pixels
    primitives: np.ndarray  # float64 (n, 6) rows (kind, y, x, a, b, angle), sorted by y
    reach: float  # largest distance from a primitive's centre to its ink
    ink: np.ndarray = dataclasses.field(default_factory=lambda: INK.copy())  # the structures' colour
    checker: float = 0.0  # amplitude of the fine texture on the structures (texture and fine tasks, class 1)
    checker_cell: float = 2.0  # side of the texture's checker squares, in 5X pixels


def _gland(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    radius = rng.uniform(7, 12)
    return [(_RING, y, x, radius, 3.0, 0.0)], 2 * math.pi * radius * 3.0


def _spindle(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    half_length = rng.uniform(10, 16)
    return [(_ELLIPSE, y, x, half_length, 2.5, rng.uniform(0, math.pi))], math.pi * half_length * 2.5


def _dot_cluster(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    count = int(rng.integers(5, 9))
    angle = rng.uniform(0, 2 * math.pi, count)
    spread = 9 * np.sqrt(rng.uniform(0, 1, count))  # uniform over a disk of radius 9
    radius = rng.uniform(2, 3, count)
    rows = [(_DISK, y + s * math.sin(a), x + s * math.cos(a), r, 0.0, 0.0)
            for a, s, r in zip(angle, spread, radius, strict=True)]
    return rows, float(np.sum(math.pi * radius**2))


def _nest(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    radius = rng.uniform(6, 9)
    return [(_DISK, y, x, radius, 0.0, 0.0)], math.pi * radius**2


def _cross(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    half_length, angle = rng.uniform(8, 12), rng.uniform(0, math.pi)
    rows = [(_ELLIPSE, y, x, half_length, 2.0, angle), (_ELLIPSE, y, x, half_length, 2.0, angle + math.pi / 2)]
    return rows, 2 * math.pi * half_length * 2.0 - 16.0


def _nodule(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    radius = rng.uniform(8, 14)
    return [(_DISK, y, x, radius, 0.0, 0.0)], math.pi * radius**2


def _chain(rng: np.random.Generator, y: float, x: float) -> tuple[list, float]:
    count, angle = int(rng.integers(4, 7)), rng.uniform(0, math.pi)
    offsets = (np.arange(count) - (count - 1) / 2) * 6.0
    rows = [(_DISK, y + o * math.sin(angle), x + o * math.cos(angle), 2.5, 0.0, 0.0) for o in offsets]
    return rows, count * math.pi * 2.5**2


# One motif per class, in class order: dark-purple rings, spindle streaks, clusters of dots, solid nests,
# crosses and chains of dots.
MOTIFS: dict[str, Callable[[np.random.Generator, float, float], tuple[list, float]]] = {
    "glands": _gland, "spindles": _spindle, "dot clusters": _dot_cluster, "nests": _nest, "crosses": _cross,
    "chains": _chain,
}
_MOTIF = list(MOTIFS.values())


TASKS = ("subtype", "detect", "texture", "fine")


def plan_slide(shape: tuple[int, int], label: int, rng: np.random.Generator, task: str = "subtype",
               fraction: float | None = None, checker: float | None = None) -> SlidePlan:
    """
    Plan a slide of ``shape`` pixels at 5X: blobby tissue on 45-65% of it, structures of class ``label``.

    ``fraction``: share of the tissue the structures cover (default ``INK_FRACTION``, or ``NODULE_FRACTION`` for
    the texture task); ``checker``: the texture task's grey-level amplitude (default 45). Smaller is harder.
    """
    height, width = shape
    cell = max(height, width) / _TISSUE_CELLS
    nodes = (math.ceil(height / cell) + 2, math.ceil(width / cell) + 2)
    field = _blur(rng.standard_normal(nodes), radius=1, passes=4)
    field /= field.std() + 1e-12
    # Elliptical radius of each node (1 at the middle of each slide edge); tissue fades out towards 0.9, leaving
    # glass all round the slide as on a real scan.
    radius = np.hypot.outer(_centred(nodes[0], height / cell), _centred(nodes[1], width / cell))
    field -= 2.5 * np.clip((radius - 0.3) / 0.6, 0.0, None) ** 2 + 4.0 * np.clip((radius - 0.8) / 0.2, 0.0, None) ** 2
    field -= np.quantile(field[radius <= 1.0], 1.0 - rng.uniform(0.55, 0.8))  # 40-65% of the slide
    texture_nodes = (math.ceil(height / _TEXTURE_CELL) + 2, math.ceil(width / _TEXTURE_CELL) + 2)
    texture = _blur(rng.standard_normal(texture_nodes, dtype=np.float32), radius=1, passes=2)
    texture = np.clip(0.5 + 0.25 * texture / (texture.std() + 1e-12), 0.0, 1.0)
    ink = INK
    if task == "detect":  # class 0 is normal tissue; class c carries the structures of shape c - 1
        rows, reach = _place_structures(shape, _MOTIF[label - 1], field, cell, rng, fraction or INK_FRACTION) \
            if label else (np.zeros((0, 6)), 1.0)
    elif task in _CHECKER_CELL:  # the same nodules in both classes; class 1's are finely textured
        rows, reach = _place_structures(shape, _nodule, field, cell, rng, fraction or NODULE_FRACTION)
        ink, checker = NODULE, (_CHECKER if checker is None else checker) * (label == 1)
    else:
        rows, reach = _place_structures(shape, _MOTIF[label], field, cell, rng, fraction or INK_FRACTION)
    order = np.argsort(rows[:, 1], kind="stable")
    return SlidePlan(shape, label, field.astype(np.float32), cell, texture.astype(np.float32), rows[order], reach,
                     ink.copy(), float(checker or 0.0) if task in _CHECKER_CELL else 0.0, _CHECKER_CELL.get(task, 2.0))


def render_region(plan: SlidePlan, magnification: float, y0: int, x0: int, height: int, width: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Paint pixels ``[y0:y0+height, x0:x0+width]`` of the slide at ``magnification`` as HxWx3 uint8 RGB."""
    scale = 5.0 / magnification  # 5X pixels per output pixel
    ys = (np.arange(y0, y0 + height) + 0.5) * scale
    xs = (np.arange(x0, x0 + width) + 0.5) * scale
    inside = _bilinear(plan.tissue, ys / plan.tissue_cell, xs / plan.tissue_cell) > 0
    grain = rng.standard_normal((height, width, 1), dtype=np.float32)
    out = _BACKGROUND + 1.5 * grain
    if inside.any():
        texture = _bilinear(plan.texture, ys / _TEXTURE_CELL, xs / _TEXTURE_CELL)[..., None]
        tissue = STROMA + texture * (_LAVENDER - STROMA) + 6.0 * grain
        ink = _ink(plan, ys, xs, scale)[..., None]
        colour = plan.ink
        if plan.checker:  # (-1) ** (floor(y / cell) + floor(x / cell)), zero mean, averaged over each pixel
            sign = _square_wave_mean(ys, scale, plan.checker_cell)[:, None] * \
                _square_wave_mean(xs, scale, plan.checker_cell)[None, :]
            colour = colour + plan.checker * sign[..., None].astype(np.float32)
        tissue += ink * (colour - tissue)
        out = np.where(inside[..., None], tissue, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _place_structures(shape: tuple[int, int], motif: Callable, field: np.ndarray, cell: float,
                      rng: np.random.Generator, fraction: float) -> tuple[np.ndarray, float]:
    target = fraction * (field > 0).mean() * shape[0] * shape[1]
    depth = min(0.3, 0.5 * float(field.max()))  # centres well inside the tissue, so whole structures show
    rows: list = []
    ink = 0.0
    while ink < target:
        ys, xs = rng.uniform(0, shape[0], 256), rng.uniform(0, shape[1], 256)
        deep = _bilinear_points(field, ys / cell, xs / cell) > depth
        for y, x in zip(ys[deep], xs[deep], strict=True):
            if ink >= target:
                break
            new, area = motif(rng, float(y), float(x))
            rows.extend(new)
            ink += area
    array = np.array(rows, dtype=np.float64).reshape(-1, 6)
    reach = float(np.max(array[:, 3] + array[:, 4], initial=0.0)) + 1.0
    return array, reach


def _ink(plan: SlidePlan, ys: np.ndarray, xs: np.ndarray, scale: float) -> np.ndarray:
    """Coverage (0-1) of the structures over the pixel grid ``ys`` x ``xs``, anti-aliased over one pixel."""
    ink = np.zeros((ys.size, xs.size), dtype=np.float32)
    prims = plan.primitives
    lo, hi = np.searchsorted(prims[:, 1], [ys[0] - plan.reach, ys[-1] + plan.reach])
    for kind, y, x, a, b, angle in prims[lo:hi]:
        extent = a + b + scale
        r0, r1 = np.searchsorted(ys, [y - extent, y + extent])
        c0, c1 = np.searchsorted(xs, [x - extent, x + extent])
        if r0 == r1 or c0 == c1:
            continue
        dy, dx = ys[r0:r1, None] - y, xs[None, c0:c1] - x
        if kind == _DISK:
            distance = np.hypot(dy, dx) - a
        elif kind == _RING:
            distance = np.abs(np.hypot(dy, dx) - a) - b / 2
        else:
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = dy * math.cos(angle) - dx * math.sin(angle)
            distance = (np.hypot(u / a, v / b) - 1.0) * b
        coverage = np.clip(0.5 - distance / scale, 0.0, 1.0)
        np.maximum(ink[r0:r1, c0:c1], coverage, out=ink[r0:r1, c0:c1])
    return ink


def _square_wave_mean(centres: np.ndarray, width: float, cell: float) -> np.ndarray:
    """
    The mean of (-1) ** floor(u / cell) over each pixel [centre - width / 2, centre + width / 2): exact, from the
    wave's integral (a triangle wave). A pixel inside one cell gets +-1 (point sampling's value, bit for bit); a
    pixel over an even number of cells gets 0, as an objective that cannot resolve the cells sees them.
    """
    def integral(u: np.ndarray) -> np.ndarray:
        phase = np.mod(u / cell, 2.0)
        return cell * np.where(phase < 1.0, phase, 2.0 - phase)

    return (integral(centres + width / 2) - integral(centres - width / 2)) / width


def _centred(nodes: int, length: float) -> np.ndarray:
    # Node positions relative to the slide's centre, -1 and 1 at its edges.
    return (np.arange(nodes, dtype=np.float64) - length / 2) / (length / 2)


def _blur(array: np.ndarray, radius: int, passes: int) -> np.ndarray:
    """Repeated box blur (close to a Gaussian) along both axes, with edge padding."""
    for _ in range(passes):
        for axis in (0, 1):
            padded = np.pad(array, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
            summed = np.cumsum(padded, axis=axis)
            size = 2 * radius + 1
            array = (np.take(summed, np.arange(size, summed.shape[axis]), axis=axis)
                     - np.take(summed, np.arange(0, summed.shape[axis] - size), axis=axis)) / size
    return array


def _bilinear(grid: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``grid`` on the outer product of node coordinates ``gy`` x ``gx`` (clamped)."""
    iy, fy = _split(gy, grid.shape[0])
    ix, fx = _split(gx, grid.shape[1])
    rows = grid[iy] * (1 - fy)[:, None] + grid[iy + 1] * fy[:, None]
    return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def _bilinear_points(grid: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    iy, fy = _split(gy, grid.shape[0])
    ix, fx = _split(gx, grid.shape[1])
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _split(coordinate: np.ndarray, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    coordinate = np.clip(coordinate, 0, nodes - 1.000001)
    index = coordinate.astype(np.int64)
    return index, (coordinate - index).astype(np.float32)
