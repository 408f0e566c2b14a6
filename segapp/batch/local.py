"""Local engine: one process, reading and writing overlapped with the model in threads.

    loader threads (decode + encoder inputs)  ->  main thread: batched model  ->  writer thread
                                                                (PNGs, rows, progress)

Queues are bounded (a few batches ahead), so memory stays flat on any folder size. Units
leave in input order, so results.jsonl and errors.jsonl have a fixed order.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from segapp.batch.infer import Loaded, UnitOutput, infer_units, load_unit
from segapp.batch.job import BatchJob, Unit
from segapp.batch.outputs import OutputStore, make_rows, write_unit_files
from segapp.predictor import Segmenter

_STOP = object()
OnUnit = Callable[[int, int, bool], None]  # (rows written, problems logged, image was read)


def write_unit(store: OutputStore, out: UnitOutput, formats: tuple[str, ...]) -> int:
    """Files first, then rows (a row only ever points at complete files); returns rows done."""
    write_unit_files(store.out_dir, out, formats)
    store.append_rows(make_rows(out))
    for problem in out.problems:
        store.append_problem(problem)
    return len(out.results)


class _Writer(threading.Thread):
    """Drains batches of UnitOutputs in order; remembers the first exception."""

    def __init__(self, store: OutputStore, formats: tuple[str, ...], on_unit: OnUnit) -> None:
        super().__init__(name="segapp-batch-writer", daemon=True)
        self.store, self.formats, self.on_unit = store, formats, on_unit
        self.inbox: queue.Queue[object] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.finished = False
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    batch = self.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                if batch is _STOP:
                    self.finished = True
                    return
                assert isinstance(batch, list)
                for out in batch:
                    if self.stop.is_set():
                        return
                    write_unit(self.store, out, self.formats)
                    self.on_unit(len(out.results), len(out.problems), out.size != (0, 0))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    def put(self, item: object) -> None:
        """Queue `item`; give up if the writer died (its error is raised by `check`)."""
        while True:
            self.check()
            try:
                self.inbox.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if not self.is_alive() and not (self.finished or self.stop.is_set()):
            raise RuntimeError("the batch writer thread stopped")


def _loaded_in_order(
    units: Sequence[Unit], load: Callable[[Unit], Loaded], workers: int, ahead: int
) -> Iterator[Loaded]:
    """Units loaded by `workers` threads, at most `ahead` in flight, yielded in order."""
    with ThreadPoolExecutor(workers, thread_name_prefix="segapp-batch-load") as pool:
        pending: deque[Future[Loaded]] = deque()
        todo = iter(units)
        try:
            for unit in todo:
                pending.append(pool.submit(load, unit))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _batches(loaded: Iterator[Loaded], size: int) -> Iterator[list[Loaded]]:
    """Consecutive units holding up to `size` readable images (unreadable ones ride along)."""
    batch: list[Loaded] = []
    readable = 0
    for item in loaded:
        batch.append(item)
        readable += item.image is not None
        if readable >= size:
            yield batch
            batch, readable = [], 0
    if batch:
        yield batch


def run_local(
    job: BatchJob,
    units: Sequence[Unit],
    store: OutputStore,
    segmenter: Segmenter,
    on_unit: OnUnit,
) -> None:
    """Segment `units` with the model in this thread; load and write in worker threads."""
    writer = _Writer(store, job.formats, on_unit)
    writer.start()

    def load(unit: Unit) -> Loaded:
        return load_unit(unit, max_pixels=job.max_pixels, segmenter=segmenter)

    try:
        ahead = 2 * job.batch_size + job.workers
        for batch in _batches(_loaded_in_order(units, load, job.workers, ahead), job.batch_size):
            writer.put(infer_units(segmenter, batch))
        writer.put(_STOP)
        while writer.is_alive():  # ends: the writer stops at _STOP or on an error
            writer.join(timeout=0.2)
        writer.check()
    finally:
        writer.stop.set()
        writer.join(timeout=60)
