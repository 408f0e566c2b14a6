"""The bounded queue in front of the model, and the table of long-running jobs.

One model thread owns the model. Work reaches it through `ModelQueue`: segment requests that
wait side by side are handed over together (the service decodes them as one batch), any other
work (a personalization fit, a video) runs alone. The queue holds at most `max_pending`
items; one more raises `Busy` at once with a Retry-After estimate, so a client under overload
gets an answer (HTTP 503) instead of a hang.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from segapp.errors import InputError, SegappError

Progress = Callable[[float, str], None]  # a job's progress: (fraction 0..1, message)

T = TypeVar("T")


class Busy(SegappError):
    """The model queue is full: try again after `retry_after` seconds."""

    exit_code = 1

    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(what, "server")
        self.retry_after = retry_after


@dataclass
class Item(Generic[T]):
    """One piece of queued work: a batchable payload or a callable, and its future."""

    future: Future[Any]
    payload: T | None = None  # batchable (segment) request
    call: Callable[[], Any] | None = None  # anything else, run alone


class ModelQueue(Generic[T]):
    """A bounded FIFO drained by one thread; consecutive payloads are run as one batch.

    `run_batch(payloads) -> list[result or Exception]` answers each payload in order.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[Any]],
        *,
        max_pending: int = 16,
        max_batch: int = 8,
        name: str = "segapp-model",
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise InputError("queue size and batch size must be at least 1", "ModelQueue")
        self.run_batch = run_batch
        self.max_pending, self.max_batch = max_pending, max_batch
        self._items: deque[Item[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy_s = 1.0  # moving average of one round's duration (Retry-After estimate)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- producer side ---------------------------------------------------------------------
    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    def retry_after(self) -> int:
        """Seconds until a full queue has likely drained (at least 1)."""
        rounds = math.ceil(max(1, self.pending()) / self.max_batch)
        return max(1, math.ceil(rounds * self._busy_s))

    def _put(self, item: Item[T]) -> Future[Any]:
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down", 5)
            if len(self._items) >= self.max_pending:
                wait = max(
                    1, math.ceil(math.ceil(len(self._items) / self.max_batch) * self._busy_s)
                )
                raise Busy(f"busy: {len(self._items)} requests are waiting, try again", wait)
            self._items.append(item)
            self._cond.notify()
        return item.future

    def submit(self, payload: T) -> Future[Any]:
        """Queue a batchable request; `Busy` if the queue is full."""
        return self._put(Item(Future(), payload=payload))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn()` alone on the model thread; `Busy` if the queue is full."""
        return self._put(Item(Future(), call=fn))

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the model thread ------------------------------------------------------------------
    def _take(self) -> list[Item[T]] | None:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait(timeout=0.5)
            if not self._items:
                return None  # closed and drained
            first = self._items.popleft()
            taken = [first]
            if first.payload is not None:
                while (
                    self._items
                    and len(taken) < self.max_batch
                    and self._items[0].payload is not None
                ):
                    taken.append(self._items.popleft())
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            live = [it for it in taken if it.future.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                if live[0].call is not None:
                    live[0].future.set_result(live[0].call())
                else:
                    answers = self.run_batch([it.payload for it in live])  # type: ignore[misc]
                    for it, answer in zip(live, answers, strict=True):
                        if isinstance(answer, BaseException):
                            it.future.set_exception(answer)
                        else:
                            it.future.set_result(answer)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(exc)
            took = time.perf_counter() - start
            if live[0].call is None:
                self._busy_s = 0.8 * self._busy_s + 0.2 * took


# ---- jobs --------------------------------------------------------------------------------------
@dataclass
class Job:
    """A long-running request (personalize, video): polled by id, owned by one user."""

    id: str
    kind: str  # "personalize" | "video"
    user: str
    state: str = "queued"  # queued | running | done | failed
    progress: float = 0.0  # 0..1
    message: str = ""
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


class JobTable:
    """Jobs by id; keeps the newest `keep` finished ones, refuses more than `max_active`."""

    def __init__(self, *, max_active: int = 4, keep: int = 64) -> None:
        self.max_active, self.keep = max_active, keep
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()

    def create(self, kind: str, user: str) -> Job:
        with self._lock:
            active = sum(not j.finished for j in self._jobs.values())
            if active >= self.max_active:
                raise Busy(f"busy: {active} jobs are running or waiting, try again later", 10)
            job = Job(f"{kind[:3]}-{next(self._counter)}-{uuid.uuid4().hex[:8]}", kind, user)
            self._jobs[job.id] = job
            done = [j for j in self._jobs.values() if j.finished]
            for old in done[: max(0, len(done) - self.keep)]:
                del self._jobs[old.id]
            return job

    def get(self, job_id: str, user: str) -> Job:
        """The job, if it exists and belongs to `user` (another user's job is 'no such job')."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.user != user:
            raise InputError(f"no such job {job_id!r}", "job")
        return job

    def update(self, job: Job, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)

    def start(
        self,
        queue: ModelQueue[Any],
        kind: str,
        user: str,
        work: Callable[[Progress], dict[str, Any]],
    ) -> Job:
        """Queue `work(progress)` on the model thread as a new job; returns the job at once.

        progress(fraction 0..1, message) updates the job; work's result (or its error) ends it.
        """
        job = self.create(kind, user)

        def progress(fraction: float, message: str) -> None:
            self.update(job, progress=float(min(max(fraction, 0.0), 1.0)), message=message)

        def run() -> None:
            self.update(job, state="running", message="started")
            try:
                result = work(progress)
            except Exception as exc:  # noqa: BLE001 - reported through the job
                self.update(job, state="failed", error=str(exc), message="failed")
            else:
                self.update(job, state="done", progress=1.0, result=result, message="done")

        try:
            queue.call(run)
        except Exception as exc:
            self.update(job, state="failed", error=str(exc), message="not started")
            raise
        return job
