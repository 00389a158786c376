"""Judges that score an answer for a trait and for coherence (0-100): API, local HF and
offline backends, their spec strings, and agreement with hand labels."""
