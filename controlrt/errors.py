"""Typed errors. Each message says what was wrong and what to do about it.

The CLI turns any :class:`ControlrtError` into one line on stderr and a non-zero exit; the
library never prints or exits.
"""

from __future__ import annotations


class ControlrtError(Exception):
    """Base class of every error controlrt raises on purpose."""

    exit_code = 1


class InputError(ControlrtError, ValueError):
    """A value given by the user (argument, image, prompt setting) is invalid."""

    exit_code = 2


class ModelError(ControlrtError):
    """A model folder is missing, unreadable, of an unsupported kind or does not fit the others."""


class BuildError(ControlrtError):
    """A build folder is missing, incomplete, corrupted or stale."""


class ExportError(ControlrtError):
    """Exporting a graph failed."""


class ValidationError(ExportError):
    """An exported graph does not reproduce the PyTorch module within its tolerance."""


class BackendError(ControlrtError):
    """A backend is unavailable or failed to run a graph."""


class ParityError(ControlrtError):
    """A backend's results differ from the PyTorch reference beyond tolerance."""
