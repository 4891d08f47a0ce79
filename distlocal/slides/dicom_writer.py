"""
Writing a slide as a DICOM whole-slide image series with wsidicom's own writer: what `bench io` measures the DICOM
reader on, and how the tests make DICOM-WSI folders from a real SVS.

Each level is served to wsidicom tile by tile from the source pyramid (``Level.read``), so a large slide is never
decoded whole; wsidicom encodes the tiles (JPEG baseline, or lossless JPEG 2000), writes one instance per level
(or several, as a concatenation) with basic offset tables, and adds the dyadic levels the source lacks.

Example:
    >>> with open_pyramid("slide.svs") as pyramid:  # doctest: +SKIP
    ...     write_dicom_slide(pyramid.levels, "slide_dicom/", mpp=0.499, lossless=True)

"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from wsidicom import ConcatenationByFrames, WsiDicom
from wsidicom.codec import Encoder
from wsidicom.codec.settings import Jpeg2kSettings, JpegSettings, Subsampling
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import ImageData, WsiInstance
from wsidicom.metadata import (
    Equipment,
    Image,
    Label,
    OpticalPath,
    Patient,
    Series,
    SlideSample,
    Study,
    WsiMetadata,
)
from wsidicom.metadata import Pyramid as PyramidMetadata
from wsidicom.metadata import Slide as SlideMetadata
from wsidicom.metadata.image import ImageType
from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
from wsidicom.source import Source

from distlocal.slides.pyramid import Level

__all__ = ["write_dicom_slide"]


class _LevelTiles(ImageData):
    """A distlocal Level as wsidicom image data: tiles read from the level on demand, padded with white."""

    def __init__(self, level: Level, tile: int, mpp: float, encoder: Encoder) -> None:
        super().__init__(encoder)
        self._level, self._tile, self._mpp = level, tile, mpp

    transfer_syntax = property(lambda self: self.encoder.transfer_syntax)
    image_size = property(lambda self: Size(self._level.shape[1], self._level.shape[0]))
    tile_size = property(lambda self: Size(self._tile, self._tile))
    pixel_spacing = property(lambda self: SizeMm(self._mpp / 1000, self._mpp / 1000))
    imaged_size = property(lambda self: SizeMm(self._level.shape[1] * self._mpp / 1000,
                                               self._level.shape[0] * self._mpp / 1000))
    samples_per_pixel = property(lambda self: 3)
    photometric_interpretation = property(lambda self: self.encoder.photometric_interpretation)
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)
    thread_safe = property(lambda self: False)
    lossy_compression = property(lambda self: None)
    transcoder = property(lambda self: None)

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        t, (height, width) = self._tile, self._level.shape
        y0, x0 = tile_point.y * t, tile_point.x * t
        out = np.full((t, t, 3), 255, np.uint8)
        y1, x1 = min(y0 + t, height), min(x0 + t, width)
        out[: y1 - y0, : x1 - x0] = self._level.read(y0, x0, y1, x1)
        return out

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return self.encoder.encode(self.get_decoded_tile(tile, z, path))


class _LevelsSource(Source):
    def __init__(self, levels: Sequence[Level], mpp: float, tile: int, encoder: Encoder) -> None:
        super().__init__()
        metadata = WsiMetadata(
            Study(uid=generate_uid()), Series(uid=generate_uid(), number=1), Patient(), Equipment(),
            SlideMetadata(identifier="slide", samples=[SlideSample(identifier="sample", uid=generate_uid())]),
            PyramidMetadata(Image(), [OpticalPath(identifier="0")], uid=generate_uid()), Label(),
            frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()])
        self._base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)
        width = levels[0].shape[1]
        # create_instance_dataset writes into the dataset it is given: each level gets its own copy. Levels after
        # the first are marked DERIVED / RESAMPLED, as scanners mark them.
        self._levels = [WsiInstance.create_instance(_LevelTiles(level, tile, mpp * width / level.shape[1], encoder),
                                                    copy.deepcopy(self._base), ImageType.VOLUME, index)
                        for index, level in enumerate(levels)]

    base_dataset = property(lambda self: self._base)
    level_instances = property(lambda self: self._levels)
    label_instances = property(lambda self: [])
    overview_instances = property(lambda self: [])
    thumbnail_instances = property(lambda self: [])
    annotation_instances = property(lambda self: [])

    def close(self) -> None:
        pass


def write_dicom_slide(levels: Sequence[Level], folder: str | os.PathLike, mpp: float, tile: int = 256,
                      lossless: bool = False, quality: int = 95, add_missing_levels: bool = True,
                      frames_per_instance: int | None = None) -> list[Path]:
    """
    Write ``levels`` (largest first; level 0 at ``mpp`` microns per pixel) as a DICOM-WSI series in ``folder``.

    ``lossless``: JPEG 2000 lossless, else JPEG baseline at ``quality`` with 4:4:4 sampling. ``frames_per_instance``
    splits each level into a concatenation of instances of that many frames. Returns the files written.
    """
    if lossless:
        settings = Jpeg2kSettings(levels=[0])
    else:
        settings = JpegSettings(quality=quality, subsampling=Subsampling.R444)
    encoder = Encoder.create_for_settings(settings)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    concatenation = ConcatenationByFrames(frames_per_instance) if frames_per_instance else None
    with WsiDicom(_LevelsSource(levels, mpp, tile, encoder)) as wsi:
        files = wsi.save(folder, workers=1, add_missing_levels=add_missing_levels, concatenation=concatenation)
    return [Path(str(f)) for f in files]
