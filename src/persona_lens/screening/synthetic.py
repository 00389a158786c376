"""The synthetic chat datasets shipped with persona-lens (see ``datasets/README.md``).

Three traits, each in three versions of the same 160 questions: ``normal`` (helpful answers
without the trait), ``i`` (mildly eliciting) and ``ii`` (strongly eliciting), as in the
paper's trait datasets. Written for this project by ``tools/make_synthetic_datasets.py``.
Screening tests and the training issue read them through :func:`synthetic_dataset`.
"""

from __future__ import annotations

from pathlib import Path

from persona_lens.core.errors import InputError

SYNTHETIC_TRAITS = ("evil", "sycophantic", "optimistic")
SYNTHETIC_VERSIONS = ("normal", "i", "ii")
DATASETS = Path(__file__).resolve().parent / "datasets"


def synthetic_dataset(trait: str, version: str) -> Path:
    """The JSONL file (messages format) of one trait's ``normal``, ``i`` or ``ii`` version."""
    if trait not in SYNTHETIC_TRAITS:
        raise InputError(
            f"no synthetic dataset for {trait!r}; there are {', '.join(SYNTHETIC_TRAITS)}"
        )
    key = version.lower()
    if key not in SYNTHETIC_VERSIONS:
        raise InputError(f"unknown version {version!r}; choose normal, i or ii")
    return DATASETS / f"{trait}_{key}.jsonl"
