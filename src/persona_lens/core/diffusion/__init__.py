"""Block-diffusion language models (DiffusionGemma): steering and capture on both streams.

A block-diffusion model writes its answer one *canvas* of ``canvas_length`` tokens at a time.
Its ``generate`` loops over canvases; for each one the **encoder** encodes what is new (the
prompt first, then the canvas just committed) into a KV cache, and the **decoder** denoises
the next canvas over several *denoising steps*, reading that cache. Both streams have L blocks
of the same width (the weights are tied), so one [L+1, d] persona vector applies to either.

- :mod:`.phases`: which forward is running (prompt, committed canvas, denoising step).
- :mod:`.steering`: a SteeringSpec applied to both streams at every denoising step.
- :mod:`.capture`: response/prompt reductions from the committed tokens and the projection
  at every denoising step.
- :mod:`.generation`: ``generate`` for these models (what ``core.generation.generate`` calls).
"""
