"""One owner per model: a second thread never runs beside the first one's hooks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.capture import Monitor
from persona_lens.core.errors import ModelBusyError
from persona_lens.core.generation import Generation, generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec, steer
from persona_lens.core.vectors import PersonaVector
from tests.tiny import load_tiny

PROMPTS = ["hello world", "world hello hello"]
LAYER = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, BlockLayout, Path]:
    return load_tiny(tmp_path_factory.mktemp("owner"), seed=3)


@pytest.fixture(scope="module")
def spec(tiny: tuple[LoadedModel, BlockLayout, Path]) -> SteeringSpec:
    layout = tiny[1]
    rows = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=torch.Generator())
    return SteeringSpec(PersonaVector(4 * rows, "noise"), 1.0, LAYER)


def _run(loaded: LoadedModel, **kwargs: Any) -> list[Generation]:
    options: dict[str, Any] = {"capture_layers": [LAYER], **kwargs}
    return generate(
        loaded.model, loaded.tokenizer, PROMPTS, max_new_tokens=4, layout=loaded.layout, **options
    )


def _last(generations: list[Generation]) -> torch.Tensor:
    return torch.stack([g.prompt_last for g in generations if g.prompt_last is not None])


class _Paused:
    """Runs ``target`` in a thread named ``owner`` and holds it inside its first forward
    (a hook on block 1) until the ``with`` block ends."""

    def __init__(self, loaded: LoadedModel, target: Callable[[], Any]) -> None:
        self.loaded, self.target = loaded, target
        self.inside, self.go = threading.Event(), threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if threading.current_thread().name == "owner" and not self.go.is_set():
            self.inside.set()
            self.go.wait(timeout=60)

    def _body(self) -> None:
        try:
            self.result = self.target()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def __enter__(self) -> _Paused:
        self._handle = self.loaded.layout.blocks[0].register_forward_hook(self._hook)
        self.thread = threading.Thread(target=self._body, name="owner")
        self.thread.start()
        assert self.inside.wait(timeout=60), "the owner thread never ran its forward"
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.thread.join(timeout=120)
        self._handle.remove()


def _try(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # the outcome is checked by the caller
        return exc


def _outcome(result: Any) -> str:
    return type(result).__name__ if isinstance(result, Exception) else "returned"


def test_unsteered_call_beside_a_steered_one_is_refused(
    tiny: tuple[LoadedModel, BlockLayout, Path], spec: SteeringSpec
) -> None:
    """Thread ``owner`` is inside a steered ``generate`` (steering only, or with a monitor);
    the main thread's unsteered ``generate``, bare ``model.generate`` and ``steer`` must raise
    ModelBusyError, never run with the owner's hooks."""
    loaded = tiny[0]
    plain, steered = _last(_run(loaded)), _last(_run(loaded, steering=[spec]))
    assert (plain - steered).abs().max() > 0.1
    expected = [g.response_ids for g in _run(loaded, steering=[spec], capture_layers=())]
    monitor = Monitor("m", spec.vector.at(1), 1)
    ids = loaded.tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    with _Paused(loaded, lambda: _run(loaded, steering=[spec], capture_layers=())) as owner:
        unsteered = _try(lambda: _run(loaded))
        bare = _try(lambda: loaded.model.generate(input_ids=ids, max_new_tokens=2))
        hooked = _try(lambda: steer(loaded.model, spec, layout=loaded.layout).remove())
    with _Paused(loaded, lambda: _run(loaded, steering=[spec], monitors=[monitor])) as watcher:
        beside_monitor = _try(lambda: _run(loaded))
    outcomes = {
        "unsteered generate()": unsteered,
        "bare model.generate": bare,
        "steer()": hooked,
        "generate() beside a monitored one": beside_monitor,
    }
    report = {k: _outcome(v) for k, v in outcomes.items()}
    if not isinstance(unsteered, Exception):
        got = _last(unsteered)
        report["unsteered prompt_last - steered"] = f"{(got - steered).abs().max():.3g}"
        report["unsteered prompt_last - plain"] = f"{(got - plain).abs().max():.3g}"
    summary = "; ".join(f"{k}: {v}" for k, v in report.items())
    assert all(isinstance(v, ModelBusyError) for v in outcomes.values()), summary
    assert "owner" in str(unsteered) and "one owner" in str(unsteered)
    for thread in (owner, watcher):
        assert thread.error is None, thread.error
    assert [g.response_ids for g in owner.result] == expected  # the owner was not disturbed


def test_one_thread_repeats_and_nests_calls(
    tiny: tuple[LoadedModel, BlockLayout, Path], spec: SteeringSpec
) -> None:
    """A single owner (a server's worker loop) is never refused: repeated and nested calls."""
    loaded = tiny[0]
    first = _last(_run(loaded, steering=[spec]))
    with steer(loaded.model, spec, layout=loaded.layout):
        nested = _last(_run(loaded))
        again = _last(_run(loaded))
    torch.testing.assert_close(nested, first)
    torch.testing.assert_close(again, first)


def test_model_passes_between_threads_when_free(
    tiny: tuple[LoadedModel, BlockLayout, Path], spec: SteeringSpec
) -> None:
    """Ownership lasts as long as a call: another thread may use the model afterwards, and
    a thread that holds the model for a long time (``owning``) keeps others out."""
    from persona_lens.core.ownership import model_owner, owning

    loaded = tiny[0]
    expected = _last(_run(loaded, steering=[spec]))
    results: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: results.append(_last(_run(loaded, steering=[spec]))))
    worker.start()
    worker.join(timeout=120)
    torch.testing.assert_close(results[0], expected)
    assert model_owner(loaded.model) is None

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with owning(loaded.model):
            held.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold, name="worker-loop")
    holder.start()
    try:
        assert held.wait(timeout=60)
        assert model_owner(loaded.model) == "worker-loop"
        with pytest.raises(ModelBusyError, match="worker-loop"):
            _run(loaded)
    finally:
        release.set()
        holder.join(timeout=60)
    assert model_owner(loaded.model) is None
    torch.testing.assert_close(_last(_run(loaded, steering=[spec])), expected)


@pytest.fixture(autouse=True)
def _no_hooks_left(tiny: tuple[LoadedModel, BlockLayout, Path]) -> Iterator[None]:
    model = tiny[0].model
    before = {id(h) for m in model.modules() for h in (*m._forward_hooks.values(),)}
    yield
    after = {id(h) for m in model.modules() for h in (*m._forward_hooks.values(),)}
    assert after == before, "hooks left on the model"
