"""The worker that owns the model: every request becomes a row of one batch, decoded step by step.

One thread (:class:`Engine`) is the model's only user (DESIGN.md: one owner per model). HTTP
handlers hand it :class:`Ticket` s through a queue and read :data:`Event` s back through a
:class:`Sink`; nothing else touches the model or the tokenizer while it runs.

Batching. On a model with a plain key/value cache (:func:`persona_lens.serving.kv.mergeable`),
a request's prompt runs alone (so its numbers do not depend on other prompts' padding) and the
row then joins the running batch between two decoding steps; a finished, timed-out or
disconnected row leaves at once and frees its slot. Other caches (sliding-window, state-space,
recurrent) cannot be padded after the fact: those models batch the requests that are waiting
when the batch is empty (a cohort, left-padded as ``generate`` does) and admit new ones when it
ends. Every decoding forward feeds one token per row. Steering is one
:class:`~persona_lens.core.steering.SteeringHandle` per batch composition with one coefficient
per row (0 for rows that do not use a vector: their stream is bit-identical to an unsteered
one); a :class:`~persona_lens.serving.probe.BatchProbe` reads projections and runs guards.

Per-token projections follow :mod:`persona_lens.core.capture`: a reply token's projection is
read in the forward that feeds it, so a token is emitted one step after it is chosen, and the
last token of a reply that hits ``max_tokens`` is fed once more only to be measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from persona_lens.core.capture import Monitor
from persona_lens.core.errors import PersonaLensError
from persona_lens.core.generation import eos_token_ids, render_chat
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringHandle, compile_specs
from persona_lens.monitoring.chat import meter_scale
from persona_lens.serving import kv
from persona_lens.serving.detokenize import ReplyText
from persona_lens.serving.errors import APIError, bad_request
from persona_lens.serving.probe import BatchProbe, GuardRows
from persona_lens.serving.resolve import GenerationJob
from persona_lens.serving.sampling import Choice, RowSampler
from persona_lens.serving.settings import ServerSettings
from persona_lens.serving.turns import assistant_spans
from persona_lens.serving.vectors import VectorLibrary

log = logging.getLogger("persona_lens.serving")

_CACHE_KWARGS = ("cache", "past_key_values", "cache_params", "state")
COHORT_GATHER_S = 0.02
"""How long a cohort waits, after its first request, for others arriving with it."""


# --- what flows back to the HTTP handler --------------------------------------------------
@dataclass(frozen=True)
class Started:
    """The prompt ran: its length, last-token projections and per-assistant-turn projections."""

    prompt_tokens: int
    prompt_projections: dict[str, float]
    turns: list[dict[str, Any]]


@dataclass(frozen=True)
class TokenOut:
    """One reply token: the text it added, the content now final, its projections, the guards
    that fired on it, and (when asked) its log-probability and the likeliest alternatives."""

    index: int
    token: int
    piece: str
    content: str
    projections: dict[str, float]
    guard_events: list[dict[str, Any]]
    token_text: str = ""
    logprob: float | None = None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """The reply ended (``stop`` or ``length``); ``content`` is the text held back until now."""

    reason: str
    completion_tokens: int
    content: str
    projections: dict[str, float]
    guard_events: list[dict[str, Any]]


@dataclass(frozen=True)
class Failed:
    """The request failed; ``error`` says how (a 4xx for the request, a 5xx for the server)."""

    error: APIError


Event = Started | TokenOut | Finished | Failed


class Sink:
    """Delivers the worker's events to one request's asyncio queue (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self, timeout: float) -> Event:
        return await asyncio.wait_for(self.queue.get(), max(timeout, 0.0))


@dataclass
class Ticket:
    """A job handed to the engine, with where its events go and when it must be done."""

    job: GenerationJob
    sink: Sink
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: the worker drops the row before its next step."""
        self.cancelled.set()

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline


# --- rows and the batch ---------------------------------------------------------------------
@dataclass
class _Row:
    ticket: Ticket
    prompt_ids: list[int]
    sampler: RowSampler
    text: ReplyText
    spans: list[Any] = field(default_factory=list)
    pending: Choice | None = None
    generated: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def job(self) -> GenerationJob:
        return self.ticket.job


@dataclass
class _Batch:
    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None
    hooks: tuple[SteeringHandle | None, BatchProbe] | None = None

    @property
    def live(self) -> list[_Row]:
        return [r for r in self.rows if not r.done]


class Engine:
    """The model's single owner: a worker thread decoding all requests as rows of one batch."""

    def __init__(
        self, loaded: LoadedModel, library: VectorLibrary, settings: ServerSettings
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.layout = loaded.layout
        self.library = library
        self.settings = settings
        self.device = next(self.model.parameters()).device
        self.eos = set(eos_token_ids(self.model, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos, default=0)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = next((k for k in _CACHE_KWARGS if k in params), "cache")
        self._positions = "position_ids" in params
        self._logits_to_keep = "logits_to_keep" in params
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_positions = int(limit) if isinstance(limit, int) and limit > 0 else None
        self.continuous = False
        self._queue: queue.Queue[Ticket] = queue.Queue(maxsize=settings.max_queue)
        self._batch = _Batch()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stats = {"forwards": 0, "decode_steps": 0, "max_rows": 0, "requests": 0}
        self._stats.update({"finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0})
        self._rows_per_step: dict[int, int] = {}

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; returns once the model is ready (meters computed)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="persona-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket; a 429 when the queue is full, a 503 when the worker has stopped."""
        if self._thread is None or self._stop.is_set():
            raise APIError(503, "the server is shutting down", "server_error", None, "unavailable")
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise APIError(
                429,
                f"{self.settings.max_queue} requests are waiting already; retry later",
                "rate_limit_error",
                None,
                "queue_full",
            ) from None
        self._stats["requests"] += 1

    def stats(self) -> dict[str, Any]:
        batch = self._batch
        return {
            **self._stats,
            "rows_per_step": dict(sorted(self._rows_per_step.items())),
            "mode": "continuous" if self.continuous else "cohort",
            "active_rows": len(batch.live),
            "waiting": self._queue.qsize(),
            "max_batch": self.settings.max_batch,
        }

    # --- the worker -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.no_grad():
                self._startup()
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._stop.is_set():
            try:
                with torch.no_grad():
                    self._cycle()
            except Exception as exc:  # a server error: fail the batch, keep serving
                log.exception("engine step failed")
                self._fail_batch(exc)

    def _startup(self) -> None:
        """Meter scales for every vector, and whether rows can join a running batch."""
        for served in self.library:
            monitor = Monitor(served.name, served.vector.at(served.layer), served.layer)
            served.meter = meter_scale(
                self.model, self.tokenizer, self.layout, monitor, served.vector
            )
        probe = torch.tensor([[self.pad_id]], device=self.device)
        out = self._forward(probe, torch.ones_like(probe), None)
        self.continuous = kv.mergeable(self._cache_of(out))

    def _cycle(self) -> None:
        self._admit()
        if self._batch.live:
            self._step()
        elif self._batch.rows:
            self._reset_batch()

    def _take(self, block: bool) -> Ticket | None:
        try:
            return self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _admit(self) -> None:
        batch = self._batch
        if batch.rows and not self.continuous:
            return  # a cohort runs to its end
        gathered = False
        new: list[_Row] = []
        while len(batch.live) + len(new) < self.settings.max_batch:
            ticket = self._take(block=not batch.live and not new)
            if ticket is None and new and not self.continuous and not gathered:
                time.sleep(COHORT_GATHER_S)  # let requests that arrive together start together
                gathered = True
                continue
            if ticket is None:
                break
            row = self._prepare(ticket)
            if row is None:
                continue
            if self.continuous:
                self._prefill([row])
            else:
                new.append(row)
        if new:
            self._prefill(new)

    def _prepare(self, ticket: Ticket) -> _Row | None:
        """Render and tokenize a ticket's prompt; None (after telling it) if it cannot run."""
        if ticket.cancelled.is_set():
            self._stats["cancelled"] += 1
            return None
        if ticket.expired:
            self._timeout(ticket)
            return None
        job = ticket.job
        try:
            ids, spans = self._tokenize(job)
        except APIError as exc:
            ticket.sink.put(Failed(exc))
            return None
        except Exception as exc:  # a template or tokenizer failure on this input
            param = "messages" if job.kind == "chat" else "prompt"
            ticket.sink.put(Failed(bad_request(f"cannot tokenize the prompt: {exc}", param)))
            return None
        row = _Row(
            ticket, ids, RowSampler(job.sampling), ReplyText(self.tokenizer, job.sampling.stop)
        )
        row.spans = spans
        row.values = {name: [] for name in job.monitor_names}
        return row

    def _tokenize(self, job: GenerationJob) -> tuple[list[int], list[Any]]:
        param = "messages" if job.kind == "chat" else "prompt"
        spans: list[Any] = []
        if job.messages is not None:
            text = render_chat(self.tokenizer, job.messages)
            try:
                encoded = self.tokenizer(
                    text, add_special_tokens=False, return_offsets_mapping=True
                )
                spans = assistant_spans(text, encoded["offset_mapping"], job.messages)
            except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: no offsets
                encoded = self.tokenizer(text, add_special_tokens=False)
        else:
            encoded = self.tokenizer(job.text or "")
        ids = [int(i) for i in encoded["input_ids"]]
        if not ids:
            raise bad_request("the prompt is empty", param)
        limit = self.settings.max_prompt_tokens
        if len(ids) > limit:
            raise bad_request(
                f"the prompt has {len(ids)} tokens; this server allows at most {limit}", param
            )
        wanted = len(ids) + job.sampling.max_tokens + 1
        if self.max_positions is not None and wanted > self.max_positions:
            raise bad_request(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({job.sampling.max_tokens}) "
                f"exceeds the model's {self.max_positions} positions",
                "max_tokens",
            )
        return ids, spans

    # --- forwards -------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> Any:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        self._stats["forwards"] += 1
        return self.model(**kwargs)

    def _cache_of(self, out: Any) -> Any:
        return getattr(out, self._cache_kwarg, None)

    @contextlib.contextmanager
    def _hooks(self, rows: Sequence[_Row], decoding: bool) -> Iterator[BatchProbe]:
        """Steering and probe hooks for ``rows`` (kept while the running batch is unchanged)."""
        batch = self._batch
        keep = decoding and rows is batch.rows
        hooks = batch.hooks if keep and batch.hooks is not None else self._build_hooks(rows)
        if keep:
            batch.hooks = hooks
        handle, probe = hooks
        probe.decoding = decoding
        if handle is not None:
            handle.attach()
        probe.attach()
        try:
            yield probe
        finally:
            probe.remove()
            if handle is not None:
                handle.remove()

    def _build_hooks(self, rows: Sequence[_Row]) -> tuple[SteeringHandle | None, BatchProbe]:
        entries = {e.key(): e for row in rows for e in row.job.steering}
        specs = []
        for key in sorted(entries):
            coefficients = [
                next((e.coefficient for e in row.job.steering if e.key() == key), 0.0)
                for row in rows
            ]
            specs.append(entries[key].spec(coefficients))
        handle = None
        if specs:
            handle = SteeringHandle(self.model, compile_specs(specs, self.layout), self.layout)
        monitors = {v.name: v for row in rows for v in row.job.monitors}
        probe_monitors = [Monitor(v.name, v.vector.at(v.layer), v.layer) for v in monitors.values()]
        guards = []
        names = sorted({g.vector.name for row in rows for g in row.job.guards})
        for name in names:
            per_row = [
                next((g for g in row.job.guards if g.vector.name == name), None) for row in rows
            ]
            served = next(g.vector for g in per_row if g is not None)
            guard = GuardRows(
                name,
                served.layer,
                served.vector.at(served.layer),
                torch.tensor([g.threshold if g else math.inf for g in per_row]),
                torch.tensor([g.coefficient if g else 0.0 for g in per_row]),
                torch.tensor([name in row.fired for row in rows]),
            )
            guard.to(self.device)
            guards.append(guard)
        return handle, BatchProbe(self.layout, probe_monitors, guards)

    # --- prompt and steps -----------------------------------------------------------------
    def _prefill(self, rows: list[_Row]) -> None:
        """Run the prompts of ``rows`` (one row: alone; a cohort: left-padded together)."""
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[b, width - len(row.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        try:
            with self._hooks(rows, decoding=False) as probe:
                out = self._forward(ids, mask, None)
            values = {name: v.float().cpu() for name, v in probe.values.items()}
            logits = out.logits[:, -1].float().cpu()
            for b, row in enumerate(rows):
                prompt = {n: v[b, width - len(row.prompt_ids) :] for n, v in values.items()}
                self._start_row(row, prompt)
                row.pending = row.sampler.choose(logits[b], self._banned(row))
                if row.pending.token in self.eos:
                    self._finish(row, "stop")
        except Exception as exc:  # a server error on these prompts: they fail, the rest go on
            log.exception("prompt forward failed")
            self._stats["errors"] += 1
            for row in rows:
                if not row.done:
                    row.ticket.sink.put(Failed(_server_error(exc)))
                    row.done = True
            return
        self._join(rows, self._cache_of(out), mask)

    def _start_row(self, row: _Row, values: dict[str, torch.Tensor]) -> None:
        names = row.job.monitor_names
        prompt = {n: float(values[n][-1]) for n in names}
        turns = []
        for span in row.spans:
            turns.append(
                {
                    "message": span.message,
                    "tokens": span.end - span.start,
                    "projections": {
                        n: float(values[n][span.start : span.end].mean()) for n in names
                    },
                }
            )
        row.ticket.sink.put(Started(len(row.prompt_ids), prompt, turns))

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows to the batch (finished ones are dropped right away)."""
        batch = self._batch
        if not self.continuous:
            batch.rows, batch.cache, batch.mask, batch.hooks = rows, cache, mask, None
            return
        keep = [b for b, row in enumerate(rows) if not row.done]
        if not keep:
            return
        if len(keep) < len(rows):
            mask = kv.select(cache, mask, keep)
        if not batch.rows or batch.mask is None:
            batch.cache, batch.mask = cache, mask
        else:
            batch.mask = kv.merge(batch.cache, batch.mask, cache, mask)
        batch.rows = [*batch.rows, *(rows[b] for b in keep)]
        batch.hooks = None

    def _step(self) -> None:
        batch = self._batch
        for row in batch.live:
            if row.ticket.cancelled.is_set():
                self._stats["cancelled"] += 1
                row.done = True
            elif row.ticket.expired:
                self._timeout(row.ticket)
                row.done = True
        self._compact()
        rows = batch.rows
        if not batch.live or batch.mask is None:
            return
        tokens = [
            r.pending.token if r.pending is not None and not r.done else self.pad_id for r in rows
        ]
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        with self._hooks(rows, decoding=True) as probe:
            out = self._forward(ids, mask, batch.cache)
        batch.mask, batch.cache = mask, self._cache_of(out)
        self._stats["decode_steps"] += 1
        live = len(batch.live)
        self._stats["max_rows"] = max(self._stats["max_rows"], live)
        self._rows_per_step[live] = self._rows_per_step.get(live, 0) + 1
        values = {name: v.float().cpu().tolist() for name, v in probe.values.items()}
        crossings = [
            (g.name, g.crossed.cpu().tolist(), g.value.cpu().tolist(), g)
            for g in probe.guards
            if g.crossed is not None and g.value is not None
        ]
        logits = out.logits[:, -1].float().cpu()
        for b, row in enumerate(rows):
            if row.done:
                continue
            try:
                self._advance(row, b, values, crossings, logits[b])
            except Exception as exc:  # this row fails; the others go on
                log.exception("decoding a row failed")
                self._stats["errors"] += 1
                row.ticket.sink.put(Failed(_server_error(exc)))
                row.done = True
        self._compact()

    def _advance(
        self,
        row: _Row,
        b: int,
        values: dict[str, list[float]],
        crossings: list[tuple[str, list[bool], list[float], GuardRows]],
        logits: torch.Tensor,
    ) -> None:
        """Emit the token row ``b`` just fed, then choose its next one (or finish)."""
        choice = row.pending
        assert choice is not None
        index = row.generated
        row.generated += 1
        projections = {n: values[n][b] for n in row.job.monitor_names}
        for name, projection in projections.items():
            row.values[name].append(projection)
        fired = []
        for name, crossed, value, guard in crossings:
            if crossed[b]:
                row.fired.add(name)
                fired.append(
                    {
                        "guard": name,
                        "token_index": index,
                        "projection": value[b],
                        "threshold": float(guard.threshold[b]),
                        "coefficient": float(guard.coefficient[b]),
                    }
                )
        row.events += fired
        piece, content = row.text.push(choice.token)
        out = TokenOut(index, choice.token, piece, content, projections, fired)
        if row.job.sampling.logprobs:
            out = dataclasses.replace(
                out,
                token_text=self._token_text(choice.token),
                logprob=choice.logprob,
                top=tuple((self._token_text(t), lp) for t, lp in choice.top),
            )
        row.ticket.sink.put(out)
        if row.text.stopped:
            self._finish(row, "stop")
        elif row.generated >= row.job.sampling.max_tokens:
            self._finish(row, "length")
        else:
            row.pending = row.sampler.choose(logits, self._banned(row))
            if row.pending.token in self.eos:
                self._finish(row, "stop")

    def _banned(self, row: _Row) -> list[int]:
        """End-of-sequence ids while the row has chosen fewer than ``min_tokens`` tokens."""
        return sorted(self.eos) if row.generated < row.job.sampling.min_tokens else []

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def _finish(self, row: _Row, reason: str) -> None:
        means = {n: (sum(v) / len(v) if v else math.nan) for n, v in row.values.items()}
        row.ticket.sink.put(
            Finished(reason, row.generated, row.text.finish(), means, list(row.events))
        )
        row.done = True
        self._stats["finished"] += 1

    def _timeout(self, ticket: Ticket) -> None:
        self._stats["timeouts"] += 1
        ticket.sink.put(
            Failed(
                APIError(
                    408,
                    f"the request ran past the server's {self.settings.request_timeout:g} s limit",
                    "timeout_error",
                    None,
                    "timeout",
                )
            )
        )

    def _compact(self) -> None:
        """Drop finished rows from a continuous batch (a cohort keeps them until it ends)."""
        batch = self._batch
        if not self.continuous or all(not r.done for r in batch.rows):
            return
        keep = [b for b, row in enumerate(batch.rows) if not row.done]
        if not keep:
            self._reset_batch()
            return
        assert batch.mask is not None
        batch.mask = kv.select(batch.cache, batch.mask, keep)
        batch.rows = [batch.rows[b] for b in keep]
        batch.hooks = None

    def _reset_batch(self) -> None:
        self._batch = _Batch()

    def _fail_batch(self, exc: Exception) -> None:
        self._stats["errors"] += 1
        for row in self._batch.live:
            row.ticket.sink.put(Failed(_server_error(exc)))
        self._reset_batch()


def _server_error(exc: Exception) -> APIError:
    if isinstance(exc, PersonaLensError):
        return APIError(500, f"the server could not run this request: {exc}", "server_error")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error", None, "internal")
