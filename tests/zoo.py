"""Registry of tiny random causal LMs, one or more per architecture family.

Every model is built from a config (nothing is downloaded), seeded with ``torch.manual_seed(0)``
(inside ``fork_rng``, so the caller's RNG state is untouched), float32, on CPU, in eval mode.
The test suite uses the zoo to check that activation capture and steering work on every family:
dense, sliding-window, MoE, SSM, hybrids, linear attention, linear RNNs, dynamic sparse
attention and block diffusion.

All models share a vocabulary of ``VOCAB_SIZE`` tokens with ``PAD_ID``, ``BOS_ID`` and ``EOS_ID``
inside it, have ``NUM_LAYERS`` residual blocks, hidden size 64 and eager attention. Anything that
would use ``mamba_ssm`` / ``causal_conv1d`` / ``fla`` kernels runs transformers' torch reference
path on CPU.

Known transformers (5.24) behaviours the tests must allow for:

* mamba, mamba2, falcon_mamba, rwkv: ``output_hidden_states`` has no embeddings entry; entry ``i``
  is the output of block ``i + 1`` and the last entry is the final norm (``hidden_states_exact=0``).
* Blocks return a plain tensor except bamba ``(hidden, attn_weights | None)``, falcon_h1
  ``(hidden,)``, rwkv ``(hidden, state, None)`` and xlstm ``(hidden, state)``; every block takes
  the hidden state as positional argument 0.
* rwkv: cached decoding is wrong for batch > 1 (the single-token time shift broadcasts the
  ``(batch, hidden)`` state against ``(batch, 1, hidden)``); batch 1 is exact.
* rwkv, xlstm: ``attention_mask`` is ignored, so left padding leaks into the recurrent state.
* recurrent_gemma: left padding is only approximately masked (~5e-3 on the logits);
  minimax: cached decoding of a left-padded row is off by ~1e-3 on the logits.
* deepseek_v32, glm_moe_dsa (dynamic sparse attention): the lightning indexer scores keys with
  a weighted sum of ReLUs, so keys can tie at exactly 0, and ``torch.topk`` breaks ties
  differently for a one-token decoding step ([B, 1, T]) than for a full forward ([B, S, T]).
  Once a tie straddles the top-k boundary, cached decoding attends to other keys than
  recomputation does (logits off by ~0.1). With 2 indexer heads a tie is common (a key ties
  at 0 when every head scores it negative); the zoo uses 8 heads, where the matrix inputs have
  none. ``tests/test_sparse_dynamic.py`` shows both, without any persona-lens hook.
* diffusion_gemma (block diffusion): ``generate`` always samples (seed it), ``model(...)``
  returns the logits of one canvas, and ``output_hidden_states`` holds the decoder's states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedModel, PreTrainedTokenizerFast

VOCAB_SIZE: int = 128
PAD_ID: int = 0
BOS_ID: int = 1
EOS_ID: int = 2
NUM_LAYERS: int = 4  # every zoo model has 4 residual blocks

CATEGORIES: tuple[str, ...] = (
    "dense",
    "sliding-window",
    "moe",
    "ssm",
    "hybrid-inter",
    "hybrid-intra",
    "linear-attention",
    "linear-rnn",
    "sparse-dynamic",
    "diffusion",
)


@dataclass(frozen=True)
class ZooEntry:
    """A tiny model of one architecture family.

    ``hidden_states_exact`` is the count ``n`` such that ``output_hidden_states`` entries
    ``0..n-1`` are exactly the residual stream: entry 0 the input of the first block, entry ``i``
    the output of block ``i``. The last entry is the final norm's output in every family.
    """

    name: str
    category: str
    build: Callable[[], PreTrainedModel]
    xfail: str | None = None
    hidden_states_exact: int | None = None
    # transformers' own limits on this family, so tests that compare cached decoding with a
    # full forward use inputs the family handles exactly: "exact", "no-left-padding" (the
    # attention mask is ignored or only approximate) or "batch-1" (batched decoding is wrong).
    decoding: str = "exact"
    # prompt length of the matrix's test batches (None: the matrix default); the dynamic
    # sparse families take prompts longer than index_topk so the indexer prunes
    prompt_length: int | None = None
    # "autoregressive" (tests/test_families.py) or "block-diffusion"
    # (tests/test_families_diffusion.py)
    generation: str = "autoregressive"


_TOKENS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "use_cache": True,
}

# Shared shape of the attention/MLP families: 4 layers, hidden 64, 4 heads of 16, GQA 2 kv heads.
_ATTN: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "attn_implementation": "eager",
}

# Four experts, two per token, small expert MLPs.
_MOE: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}


def _builder(model_cls: str, config_cls: str, **overrides: Any) -> Callable[[], PreTrainedModel]:
    """Return a function that builds ``model_cls`` from ``config_cls(**_TOKENS, **overrides)``."""

    def build() -> PreTrainedModel:
        config = getattr(transformers, config_cls)(**{**_TOKENS, **overrides})
        with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's RNG
            torch.manual_seed(0)
            model: PreTrainedModel = getattr(transformers, model_cls)(config)
        return model.to(device="cpu", dtype=torch.float32).eval()

    build.__name__ = f"build_{model_cls}"
    build.__qualname__ = build.__name__
    return build


def _entry(
    name: str,
    category: str,
    model_cls: str,
    config_cls: str,
    *,
    xfail: str | None = None,
    hidden_states_exact: int | None = NUM_LAYERS,
    decoding: str = "exact",
    prompt_length: int | None = None,
    **overrides: Any,
) -> ZooEntry:
    return ZooEntry(
        name=name,
        category=category,
        build=_builder(model_cls, config_cls, **overrides),
        xfail=xfail,
        hidden_states_exact=hidden_states_exact,
        decoding=decoding,
        prompt_length=prompt_length,
    )


# Attention without ``head_dim`` (set by the family itself, e.g. from the mamba or MLA sizes).
_NO_HEAD_DIM: dict[str, Any] = {k: v for k, v in _ATTN.items() if k != "head_dim"}
# Multi-head latent attention: ``head_dim`` must not be passed (it would override
# ``qk_rope_head_dim``), and there are as many kv heads as query heads.
_MLA_ATTN: dict[str, Any] = {**_NO_HEAD_DIM, "num_key_value_heads": 4}

_MAMBA2_HEADS: dict[str, Any] = {
    "mamba_n_heads": 8,  # 8 heads x 16 = expand (2) x hidden (64)
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 16,
}

# DeepSeek sparse attention: multi-head latent attention whose lightning indexer keeps the top
# ``index_topk`` keys per query; prompts of 20 tokens (> 8) so that it really prunes.
_DSA: dict[str, Any] = {
    **_MLA_ATTN,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,  # layer 0 dense MLP, layers 1-3 MoE
    "index_topk": 8,
    "index_head_dim": 16,
    "index_n_heads": 8,  # 2 heads tie at exactly 0 (see the module docstring)
    **_MOE,
}
DSA_PROMPT_LENGTH = 20

CANVAS_LENGTH = 8  # block diffusion: tokens per canvas
DENOISING_STEPS = 4  # block diffusion: denoising steps per canvas (the model's default is 48)


def build_diffusion_gemma(
    vocab_size: int = VOCAB_SIZE,
    *,
    hidden_size: int = 64,
    num_layers: int = NUM_LAYERS,
    canvas_length: int = CANVAS_LENGTH,
    denoising_steps: int = DENOISING_STEPS,
    token_ids: tuple[int, int, int] = (PAD_ID, BOS_ID, EOS_ID),
) -> PreTrainedModel:
    """A tiny DiffusionGemma: 4 layers (the last full attention, the others sliding), 4
    experts, and a one-layer vision tower of width 32 (the default vision config alone has
    168M parameters). The keywords scale it up for benchmarks."""
    pad, bos, eos = token_ids
    heads = max(4, hidden_size // 16)
    text = transformers.DiffusionGemmaTextConfig(
        vocab_size=vocab_size,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=16,
        global_head_dim=16,  # head size of the full-attention layers
        max_position_embeddings=4096,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=hidden_size // 2,
        sliding_window=8,
        layer_types=[*["sliding_attention"] * (num_layers - 1), "full_attention"],
        attn_implementation="sdpa",
    )
    vision = transformers.Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    )
    config = transformers.DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=canvas_length
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: PreTrainedModel = transformers.DiffusionGemmaForBlockDiffusion(config)
    model.generation_config.max_denoising_steps = denoising_steps
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return model.to(device="cpu", dtype=torch.float32).eval()


_ENTRIES: list[ZooEntry] = [
    # --- dense ---------------------------------------------------------------------------------
    _entry("llama", "dense", "LlamaForCausalLM", "LlamaConfig", **_ATTN),
    _entry("qwen2", "dense", "Qwen2ForCausalLM", "Qwen2Config", **_ATTN),
    _entry(
        "gpt2",
        "dense",
        "GPT2LMHeadModel",
        "GPT2Config",
        n_embd=64,
        n_layer=NUM_LAYERS,
        n_head=4,
        n_inner=128,
        n_positions=256,
        attn_implementation="eager",
    ),
    _entry("phi3", "dense", "Phi3ForCausalLM", "Phi3Config", **_ATTN),
    _entry("doge", "dense", "DogeForCausalLM", "DogeConfig", keep_window_size=256, **_ATTN),
    # --- sliding window ------------------------------------------------------------------------
    _entry(
        "mistral",
        "sliding-window",
        "MistralForCausalLM",
        "MistralConfig",
        sliding_window=8,
        **_ATTN,
    ),
    _entry(
        "gemma3",
        "sliding-window",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        sliding_window=8,
        layer_types=[*["sliding_attention"] * 3, "full_attention"],  # window 8 < prompt length
        **_ATTN,
    ),
    # --- mixture of experts --------------------------------------------------------------------
    _entry(
        "mixtral",
        "moe",
        "MixtralForCausalLM",
        "MixtralConfig",
        num_local_experts=4,
        num_experts_per_tok=2,
        **{**_ATTN, "intermediate_size": 32},
    ),
    _entry(
        "qwen3_moe", "moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_experts=4, **_MOE, **_ATTN
    ),
    _entry(
        "qwen2_moe",
        "moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        num_experts=4,
        shared_expert_intermediate_size=32,
        **_MOE,
        **_ATTN,
    ),
    _entry(
        "olmoe",
        "moe",
        "OlmoeForCausalLM",
        "OlmoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        **{**_ATTN, "intermediate_size": 32},
    ),
    _entry(
        "gpt_oss",
        "moe",
        "GptOssForCausalLM",
        "GptOssConfig",
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,  # layers 0, 2 sliding; 1, 3 full
        # YaRN as in the real model, with a pre-yarn context matching max_position_embeddings / 32
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 8,
        },
        **{**_ATTN, "intermediate_size": 32},
    ),
    _entry(
        "deepseek_v3",
        "moe",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,  # layer 0 dense MLP, layers 1-3 MoE
        q_lora_rank=32,  # multi-head latent attention
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        num_mtp_layers=0,  # no multi-token-prediction head
        **_MOE,
        **_MLA_ATTN,
    ),
    _entry(
        "llama4",
        "moe",
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        intermediate_size_mlp=128,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,  # layers 0-2 chunked attention, layer 3 full (no rope)
        **{**_ATTN, "intermediate_size": 32},
    ),
    # --- state space models --------------------------------------------------------------------
    _entry(
        "mamba",
        "ssm",
        "MambaForCausalLM",
        "MambaConfig",
        hidden_states_exact=0,  # no embeddings entry: entry i = output of block i + 1
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        state_size=16,
        expand=2,
        conv_kernel=4,
    ),
    _entry(
        "mamba2",
        "ssm",
        "Mamba2ForCausalLM",
        "Mamba2Config",
        hidden_states_exact=0,  # no embeddings entry: entry i = output of block i + 1
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_heads=8,  # 8 heads x 16 = expand (2) x hidden (64)
        head_dim=16,
        n_groups=1,
        state_size=16,
        expand=2,
        conv_kernel=4,
        chunk_size=16,
    ),
    _entry(
        "falcon_mamba",
        "ssm",
        "FalconMambaForCausalLM",
        "FalconMambaConfig",
        hidden_states_exact=0,  # no embeddings entry: entry i = output of block i + 1
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        state_size=16,
        expand=2,
        conv_kernel=4,
    ),
    # --- hybrids: attention and SSM/conv layers interleaved ------------------------------------
    _entry(
        "jamba",
        "hybrid-inter",
        "JambaForCausalLM",
        "JambaConfig",
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,  # layers 1, 3 attention; 0, 2 mamba
        expert_layer_period=2,
        expert_layer_offset=1,  # layers 1, 3 MoE
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        **_NO_HEAD_DIM,
    ),
    _entry(
        "bamba",
        "hybrid-inter",
        "BambaForCausalLM",
        "BambaConfig",
        attn_layer_indices=[1, 3],  # 0, 2 mamba2
        **_MAMBA2_HEADS,
        **_NO_HEAD_DIM,
    ),
    _entry(
        "zamba2",
        "hybrid-inter",
        "Zamba2ForCausalLM",
        "Zamba2Config",
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        n_mamba_heads=8,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_ngroups=1,
        chunk_size=16,
        adapter_rank=8,  # the hybrid layers share one attention block (num_mem_blocks=1)
        max_position_embeddings=256,
        attn_implementation="eager",
    ),
    _entry(
        "nemotron_h",
        "hybrid-inter",
        "NemotronHForCausalLM",
        "NemotronHConfig",
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        # one mixer per block: mamba, MoE, attention, MLP
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        ssm_state_size=16,
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=1,
        conv_kernel=4,
        expand=2,
        chunk_size=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        max_position_embeddings=256,
        attn_implementation="eager",
    ),
    _entry(
        "granitemoehybrid",
        "hybrid-inter",
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridConfig",
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=64,
        **_MAMBA2_HEADS,
        **{**_NO_HEAD_DIM, "intermediate_size": 32},
    ),
    _entry(
        "lfm2",
        "hybrid-inter",
        "Lfm2ForCausalLM",
        "Lfm2Config",
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        block_auto_adjust_ff_dim=False,  # else intermediate_size is rounded up to 256
        conv_L_cache=3,
        **_NO_HEAD_DIM,
    ),
    _entry(
        "qwen3_next",
        "hybrid-inter",
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        shared_expert_intermediate_size=32,
        **_MOE,
        **_ATTN,
    ),
    _entry(
        "kimi_linear",
        "hybrid-inter",
        "KimiLinearForCausalLM",
        "KimiLinearConfig",
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_head_dim=16,
        linear_num_heads=4,
        linear_conv_kernel_dim=4,
        num_local_experts=4,
        n_shared_experts=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        **_MOE,
        **_MLA_ATTN,
    ),
    # --- intra-layer hybrid: attention and SSM in parallel inside each block -------------------
    _entry(
        "falcon_h1",
        "hybrid-intra",
        "FalconH1ForCausalLM",
        "FalconH1Config",
        mamba_d_ssm=None,
        **_MAMBA2_HEADS,
        **_ATTN,
    ),
    # --- linear attention ----------------------------------------------------------------------
    _entry(
        "minimax",
        "linear-attention",
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        decoding="no-left-padding",
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=8,  # lightning-attention chunk; < prompt length so several chunks run
        **{**_ATTN, "intermediate_size": 32},
    ),
    # --- linear RNNs ---------------------------------------------------------------------------
    _entry(
        "rwkv",
        "linear-rnn",
        "RwkvForCausalLM",
        "RwkvConfig",
        decoding="batch-1",
        hidden_states_exact=0,  # no embeddings entry: entry i = output of block i + 1
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        attention_hidden_size=64,
        intermediate_size=128,
        context_length=256,
        rescale_every=0,  # no in-place weight rescaling at the first eval forward
        # cached decoding is wrong for batch > 1 in transformers 5.24 (see module docstring)
    ),
    _entry(
        "recurrent_gemma",
        "linear-rnn",
        "RecurrentGemmaForCausalLM",
        "RecurrentGemmaConfig",
        decoding="no-left-padding",
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        lru_width=64,
        attention_window_size=8,
        block_types=["recurrent", "recurrent", "attention"],  # cycled: r, r, a, r
        attn_implementation="eager",
    ),
    _entry(
        "xlstm",
        "linear-rnn",
        "xLSTMForCausalLM",
        "xLSTMConfig",
        decoding="no-left-padding",
        hidden_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_heads=4,
        qk_dim_factor=1.0,  # 0.5 (the default) breaks use_cache=True: cache state shape mismatch
        chunk_size=16,
        autocast_kernel_dtype="float32",  # default bfloat16
        ffn_round_up_to_multiple_of=16,
    ),
    # --- dynamic sparse attention (an indexer picks each query's keys) -------------------------
    _entry(
        "deepseek_v32",
        "sparse-dynamic",
        "DeepseekV32ForCausalLM",
        "DeepseekV32Config",
        prompt_length=DSA_PROMPT_LENGTH,
        **_DSA,
    ),
    _entry(
        "glm_moe_dsa",
        "sparse-dynamic",
        "GlmMoeDsaForCausalLM",
        "GlmMoeDsaConfig",
        prompt_length=DSA_PROMPT_LENGTH,
        **_DSA,
    ),
    # --- block diffusion: an encoder commits canvases, a decoder denoises them -----------------
    ZooEntry(
        name="diffusion_gemma",
        category="diffusion",
        build=build_diffusion_gemma,
        hidden_states_exact=NUM_LAYERS,
        generation="block-diffusion",
    ),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the zoo's vocabulary: the special tokens at their ids,
    ``user``, ``assistant``, ``system`` and ``:`` for the plain chat rendering, then words
    ``w8`` .. ``w127``; left padding with ``<pad>``."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system", ":"]
    words += [f"w{i}" for i in range(len(words), VOCAB_SIZE)]
    model = WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def build(name: str) -> PreTrainedModel:
    """Build the tiny model registered as ``name`` (seeded, float32, CPU, eval mode)."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}") from None
    return entry.build()
