"""Typed exceptions. Every user mistake raises a subclass of :class:`PersonaLensError`;
the command line turns it into one line on stderr and exit code 2."""

from __future__ import annotations


class PersonaLensError(Exception):
    """Base class of every error caused by user input or environment."""


class ModelSpecError(PersonaLensError):
    """A model spec that names no loadable model."""


class ArchitectureError(PersonaLensError):
    """The residual blocks of a model could not be found."""


class LayerError(PersonaLensError):
    """A layer index outside 0..L (or 1..L where steering)."""


class VectorError(PersonaLensError):
    """A malformed vector: wrong shape, NaN/inf, unreadable file."""


class VectorMismatchError(VectorError):
    """A vector made for another model than the one it is applied to."""


class InputError(PersonaLensError):
    """Malformed user input: empty prompt list, bad JSONL line, bad option value."""


class ModelBusyError(PersonaLensError):
    """A model used from a second thread while another thread holds it (one owner per model)."""


class NonFiniteError(PersonaLensError):
    """The model's activations became NaN or infinite (usually: a steering coefficient too
    large for its vector)."""
