"""Trait definitions (the built-in library in ``library/``) and the generator that writes new
ones from a name and a description: where the data flow starts."""
