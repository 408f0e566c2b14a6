"""Exceptions for people: each carries *what* went wrong and *where*.

The CLI prints ``error: <what> (<where>)`` on one line and exits with ``exit_code``
(2 for bad input, 1 for an internal failure).
"""

from __future__ import annotations


class SegappError(Exception):
    """Base class of segapp's own errors."""

    exit_code = 1

    def __init__(self, what: str, where: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what


class InputError(SegappError):
    """The user gave something segapp cannot use (a file, an instruction, a name)."""

    exit_code = 2


class ModelError(SegappError):
    """A model or checkpoint could not be built or loaded."""

    exit_code = 2
