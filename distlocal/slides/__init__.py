"""
Reading whole-slide images at 5X with their tissue crop, and writing synthetic slides.

Example:
    >>> from distlocal.slides import read_slide
    >>> slide = read_slide("TCGA-XX.svs", magnification=5.0)  # doctest: +SKIP
    >>> slide.image.shape, slide.mask.mean()  # doctest: +SKIP
    ((9216, 14080, 3), 0.61)

"""

from distlocal.slides.errors import SlideError
from distlocal.slides.reader import SlideImage, read_slide, slide_info
from distlocal.slides.synthetic import write_synthetic_dataset, write_synthetic_slide

__all__ = ["SlideError", "SlideImage", "read_slide", "slide_info", "write_synthetic_dataset", "write_synthetic_slide"]
