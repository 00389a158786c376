"""LoRA adapters on a loaded model: attached for training, applied from a folder for use, and
always taken off again, so the caller's model is unchanged afterwards.

Both handles patch the model in place (peft injects LoRA layers into its linear modules), so
the model object, its blocks and its block layout stay the same while the adapter is on; on
exit ``unload()`` puts the original modules back, exactly (nothing is merged into weights).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from persona_lens.core.errors import InputError
from persona_lens.core.models import LoadedModel
from persona_lens.training.config import TrainConfig

RECORD = "train.json"
ADAPTER_CONFIG = "adapter_config.json"


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise InputError(
            "fine-tuning needs peft, transformers' Trainer and accelerate: "
            "pip install 'persona-lens[train]'"
        ) from exc
    return peft


def lora_config(config: TrainConfig) -> Any:
    """The peft ``LoraConfig`` of a training config (rsLoRA scaling alpha / sqrt(r))."""
    peft = _peft()
    return peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.rslora,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Restore ``requires_grad`` flags and train/eval mode on exit."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    training = model.training
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        model.train(training)


@contextmanager
def lora_attached(model: nn.Module, config: TrainConfig) -> Iterator[Any]:
    """A fresh trainable LoRA adapter on ``model`` (a peft model, yielded); removed on exit."""
    peft = _peft()
    with _restored(model):
        with warnings.catch_warnings():  # peft reads a deprecated transformers attribute
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            peft_model = peft.get_peft_model(model, lora_config(config))
        try:
            yield peft_model
        finally:
            peft_model.unload()


def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``train.json`` of an adapter folder (None for a foreign peft adapter)."""
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a readable training record ({exc})") from exc
    return data if isinstance(data, dict) else None


def check_adapter(folder: str | Path, loaded: LoadedModel) -> dict[str, Any] | None:
    """Refuse a folder that holds no LoRA adapter or one trained on another model; returns
    its training record, if it has one."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"--adapter {path}: no such folder")
    if not (path / ADAPTER_CONFIG).is_file():
        raise InputError(f"--adapter {path}: no {ADAPTER_CONFIG}; is it a trained adapter?")
    record = read_record(path)
    trained_on = (record or {}).get("model_fingerprint")
    if trained_on and trained_on != loaded.fingerprint:
        raise InputError(
            f"--adapter {path} was trained on {record.get('model', 'another model')} "  # type: ignore[union-attr]
            f"(fingerprint {trained_on}), not on {loaded.spec} ({loaded.fingerprint})"
        )
    return record


@contextmanager
def adapter_applied(loaded: LoadedModel, folder: str | Path) -> Iterator[LoadedModel]:
    """``loaded`` with the adapter in ``folder`` active (checked first); removed on exit.

    The vectors, fingerprint and layout of ``loaded`` stay those of the base model."""
    check_adapter(folder, loaded)
    _ = loaded.fingerprint, loaded.layout  # the base model's, computed before the adapter
    peft = _peft()
    with _restored(loaded.model):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                peft_model = peft.PeftModel.from_pretrained(loaded.model, str(folder))
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"--adapter {folder}: cannot load it ({detail})") from exc
        peft_model.eval()
        try:
            yield loaded
        finally:
            peft_model.unload()
