"""A tiny Llama with a word-level tokenizer and a chat template, saved to a directory.

Built from a config and an in-memory tokenizer, so nothing is downloaded; pass the directory
as a model spec (``--model DIR``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.models import LoadedModel, load_model, model_fingerprint
from persona_lens.core.vectors import PersonaVector

WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", "hello", "world", ":"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
HIDDEN_SIZE = 64


def tiny_tokenizer(size: int = len(WORDS)) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (then ``w8``, ``w9``... up to ``size``
    entries) with bos/eos/unk and a chat template."""
    words = [*WORDS, *(f"w{i}" for i in range(len(WORDS), size))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=TEMPLATE,
    )


def tiny_model_dir(
    path: Path, seed: int, num_layers: int = 2, *, context: int = 64, endless: bool = False
) -> Path:
    """Save a random tiny Llama (d=64, ``num_layers`` blocks, ``context`` positions) and its
    tokenizer to ``path``. ``endless``: its generation config never lets it write the
    end-of-sequence token, so a reply runs to ``max_new_tokens`` (for interruption tests)."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if endless:
        model.generation_config.suppress_tokens = [config.eos_token_id]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tiny(path: Path, seed: int, num_layers: int = 2) -> tuple[LoadedModel, BlockLayout, Path]:
    """Save a tiny Llama to ``path`` and load it back as a user would (``--model DIR``)."""
    model_dir = tiny_model_dir(path, seed=seed, num_layers=num_layers)
    loaded = load_model(str(model_dir))
    return loaded, loaded.layout, model_dir


def random_trait_vector(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    trait: str,
    *,
    seed: int,
    best_layer: int,
    scale: float = 1.0,
) -> PersonaVector:
    """A random vector for the tiny model, with the metadata of an extracted one."""
    loaded, layout, model_dir = tiny
    rows = torch.randn(
        layout.num_layers + 1, layout.hidden_size, generator=torch.Generator().manual_seed(seed)
    )
    meta = {
        "best_layer": str(best_layer),
        "model": str(model_dir),
        "model_fingerprint": model_fingerprint(loaded.model, loaded.tokenizer),
    }
    return PersonaVector(scale * rows, trait, meta)


def zoo_model_dir(path: Path, name: str) -> Path:
    """Save the zoo model ``name`` with a word-level tokenizer over its whole vocabulary (ids
    0, 1, 2 are the zoo's pad/unk, bos and eos) to ``path``, to load as ``--model DIR``."""
    from tests import zoo

    zoo.build(name).save_pretrained(path)
    tiny_tokenizer(zoo.VOCAB_SIZE).save_pretrained(path)
    return path
