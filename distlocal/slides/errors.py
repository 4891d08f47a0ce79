"""
The one exception the slide layer raises for bad input.

Training and preparation decide per slide whether to skip or fail (`data.on_error`), so every problem with a
slide file surfaces as a `SlideError` that names the slide, the problem and the fix, never as a raw tifffile or
imagecodecs exception.
"""

from __future__ import annotations

__all__ = ["SlideError"]


class SlideError(Exception):
    """
    A slide that cannot be read: ``str(error)`` is ``"<path>: <problem>. <fix>"``.

    The parts stay available as ``path``, ``problem`` and ``fix`` so that reports can list skipped slides. They are
    also the exception's ``args``, so the error survives pickling across worker processes and Ray actors. Called
    with one argument (``SlideError("slide a.svs could not be read: ...")``) that argument is the whole message.

    Example:
        >>> str(SlideError("a.svs", "file not found", "check the manifest's path column"))
        "a.svs: file not found. check the manifest's path column"

    """

    def __init__(self, path: object, problem: str = "", fix: str = "") -> None:
        super().__init__(path, problem, fix)
        self.path = str(path)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        parts = [f"{self.path}: {self.problem}" if self.problem else self.path]
        if self.fix:
            parts.append(self.fix)
        return ". ".join(parts)
