"""persona-lens: persona vectors for every architecture family."""

__version__ = "0.1.0"
