"""``python -m persona_lens.cli``: the ``persona`` command (what ``accelerate launch -m`` runs)."""

from persona_lens.cli import main

main()
