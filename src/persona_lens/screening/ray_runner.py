"""Scoring shards on a Ray cluster (``--ray``: a local instance; ``--ray ADDRESS``: a cluster).

Ray Data runs :class:`ShardScorer`, an actor class holding one model replica, through
``map_batches`` with an actor pool (``compute=``): one replica per worker, or one per GPU where
the cluster has GPUs. Each item is one shard's position in the input, so every worker reads its
own rows (the input path must be readable on the workers: a local run, or shared storage on a
cluster) and returns the stored lines of the shard; the driver writes them into the work folder
as they arrive. Scores equal the local run's, and the final outputs are built the same way, so
they come out in the same order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from persona_lens.core.errors import InputError, PersonaLensError
from persona_lens.screening.scoring import ScoreSettings
from persona_lens.screening.sources import Shard, Source

LOCAL = "local"


class ShardScorer:
    """A Ray Data actor: loads the model once, then scores one shard per call.

    A setup problem (a vector made for another model, a backend that cannot start) is
    returned as an ``error`` row, not raised, so the driver can print it as one line.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from pathlib import Path

        import torch

        from persona_lens.core.models import load_model
        from persona_lens.screening.scoring import (
            Scorer,
            check_vectors,
            monitors_from_config,
            vectors_from_config,
        )
        from persona_lens.screening.sources import ShardReader

        self.error = ""
        if config["threads"]:
            torch.set_num_threads(config["threads"])
        try:
            loaded = load_model(config["model"], device=config["device"], dtype=config["dtype"])
            check_vectors(vectors_from_config(config["vectors"]), loaded)
            monitors = monitors_from_config(config["monitors"])
            self.scorer = Scorer(loaded, monitors, ScoreSettings(**config["settings"]))
        except PersonaLensError as exc:
            self.error = str(exc)
        self.reader = ShardReader(Source(Path(config["path"]), config["format"]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from persona_lens.screening.shards import score_shard

        indices, texts = [], []
        for k in range(len(batch["index"])):
            shard = Shard(
                int(batch["index"][k]),
                int(batch["first_row"][k]),
                int(batch["rows"][k]),
                (int(batch["cursor0"][k]), int(batch["cursor1"][k])),
            )
            indices.append(shard.index)
            if not self.error:
                try:
                    texts.append("\n".join(score_shard(self.reader, shard, self.scorer)))
                    continue
                except OSError as exc:  # e.g. an input path the worker cannot see
                    self.error = f"a Ray worker cannot read {self.reader.source.path}: {exc}"
                except PersonaLensError as exc:
                    self.error = str(exc)
            texts.append(self.error)
        return {
            "index": np.array(indices, dtype=np.int64),
            "error": np.array([bool(self.error)] * len(indices)),
            "lines": np.array(texts, dtype=object),
        }


def import_ray() -> Any:
    """Ray, quietly; InputError (one line, exit 2) when it is not installed."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InputError("--ray needs Ray: pip install 'persona-lens[ray]'") from exc
    return ray


def run_on_ray(
    address: str,
    shards: Sequence[Shard],
    config: dict[str, Any],
    store: Callable[[int, list[str]], None],
    *,
    workers: int | None = None,
) -> int:
    """Score ``shards`` on Ray and ``store(index, lines)`` each as it finishes; returns the
    number of workers used. ``address`` is :data:`LOCAL` for a local instance."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        }
        if address == LOCAL:
            options["num_cpus"] = os.cpu_count() or 1
        else:
            options["address"] = address
        try:
            ray.init(**options)
        except Exception as exc:  # connection errors have many types
            raise InputError(f"cannot start or reach Ray at {address}: {exc}") from exc
        started = True
    try:
        return _run(ray, shards, config, store, workers)
    finally:
        if started:
            ray.shutdown()


def _run(
    ray: Any,
    shards: Sequence[Shard],
    config: dict[str, Any],
    store: Callable[[int, list[str]], None],
    workers: int | None,
) -> int:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    size = workers or gpus or 1
    if size < 1:
        raise InputError("--workers must be at least 1")
    size = min(size, len(shards))
    per_worker: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {}
    if not gpus:
        per_worker["num_cpus"] = max(1, int(resources.get("CPU", 1)) // size)
    config = {**config, "threads": int(per_worker["num_cpus"]) if not gpus else 0}
    items = [
        {
            "index": s.index,
            "first_row": s.first_row,
            "rows": s.rows,
            "cursor0": s.cursor[0],
            "cursor1": s.cursor[1],
        }
        for s in shards
    ]
    dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 256)).map_batches(
        ShardScorer,
        fn_constructor_kwargs={"config": config},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size),
        **per_worker,
    )
    try:
        for row in dataset.iter_rows():
            if row["error"]:
                raise PersonaLensError(str(row["lines"]))
            text = str(row["lines"])
            store(int(row["index"]), text.split("\n") if text else [])
    except ray.exceptions.RayError as exc:  # a worker died or raised: say what, in one line
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise PersonaLensError(f"the Ray run failed: {lines[-1] if lines else exc!r}") from exc
    return size
