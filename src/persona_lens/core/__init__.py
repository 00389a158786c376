"""The primitives everything else builds on: model loading, block discovery, positions,
vectors, steering, capture, generation, errors and atomic files. Imports nothing outside core."""
