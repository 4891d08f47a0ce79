"""Fixtures for the slide tests: small pyramidal slides written with tifffile."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slides.slide_files import TISSUE_BOX_20X, aperio, pyramid, tissue_image, write_svs


@pytest.fixture
def svs_20x(tmp_path: Path) -> Path:
    """A 1024 x 1024 20X SVS with a 5X (256) and a 1.25X (64) level; tissue in TISSUE_BOX_20X."""
    levels = pyramid(tissue_image((1024, 1024), TISSUE_BOX_20X), 4, 3)
    return write_svs(tmp_path / "slide.svs", levels, aperio((1024, 1024)))
