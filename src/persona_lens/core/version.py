"""The library version, recorded in every file persona-lens writes."""

__version__ = "0.1.0"
