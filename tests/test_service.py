"""The service facade and its queue: batching never changes a result, one bad request fails
alone, a full queue refuses at once with a Retry-After, jobs belong to their user."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from segapp.data.instructions import generate_sample
from segapp.errors import InputError
from segapp.scheduler import Busy, JobTable, ModelQueue
from segapp.service import Service, ServiceConfig


def test_full_queue_refuses_at_once_and_batches_what_waits() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def run(payloads: list[int]) -> list[object]:
        gate.wait(10)
        batches.append(payloads)
        return [ValueError("odd") if p % 2 else p * 10 for p in payloads]

    queue: ModelQueue[int] = ModelQueue(run, max_pending=5, max_batch=3)
    try:
        first = queue.submit(0)  # taken by the model thread, which then blocks on the gate
        for _ in range(100):
            if queue.pending() == 0:
                break
            threading.Event().wait(0.01)
        waiting = [queue.submit(i) for i in range(1, 6)]
        with pytest.raises(Busy) as refused:
            queue.submit(99)
        assert refused.value.retry_after >= 1
        gate.set()
        assert first.result(10) == 0
        for i, future in enumerate(waiting, 1):
            if i % 2:
                with pytest.raises(ValueError):
                    future.result(10)
            else:
                assert future.result(10) == i * 10
        assert batches == [[0], [1, 2, 3], [4, 5]]
    finally:
        queue.close()


def test_jobs_belong_to_their_user_and_are_bounded() -> None:
    table = JobTable(max_active=2)
    job = table.create("personalize", "alice")
    assert table.get(job.id, "alice") is job
    with pytest.raises(InputError, match="no such job"):
        table.get(job.id, "bob")
    table.create("video", "alice")
    with pytest.raises(Busy):
        table.create("video", "bob")
    table.update(job, state="done")
    table.create("video", "bob")  # a finished job frees its slot


@pytest.fixture(scope="module")
def service(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    svc = Service(
        ServiceConfig(
            model=str(random_model_dir),
            max_new_tokens=8,
            concepts_root=tmp_path_factory.mktemp("concepts"),
        )
    )
    yield svc
    svc.close()


def test_a_crowd_gets_what_each_request_gets_alone(service: Service) -> None:
    images = [generate_sample("test", i).image for i in range(4)]
    asks = ["all the circles", "segment the blue square", "x" * 10, "what can roll?"]
    alone = [service.segment(im, ask) for im, ask in zip(images, asks, strict=True)]
    service._images.clear()  # encode again, this time as one batch
    futures = [service.submit_segment(im, ask) for im, ask in zip(images, asks, strict=True)]
    crowd = [f.result(60) for f in futures]
    for a, b in zip(alone, crowd, strict=True):
        assert (a.answer, [m.score for m in a.masks]) == (b.answer, [m.score for m in b.masks])
        for ma, mb in zip(a.masks, b.masks, strict=True):
            np.testing.assert_array_equal(ma.mask, mb.mask)


def test_bad_requests_fail_alone_with_clear_messages(service: Service) -> None:
    image = generate_sample("test", 0).image
    with pytest.raises(InputError, match="instruction is empty"):
        service.submit_segment(image, "  ")
    with pytest.raises(InputError, match="not an image file"):
        service.submit_segment(b"plain text", "all the circles")
    with pytest.raises(InputError, match="image too large"):
        Service(ServiceConfig(max_pixels=100)).submit_segment(image, "x")
    futures = [
        service.submit_segment(image, "segment <nosuch>", user="alice"),
        service.submit_segment(image, "all the circles", user="alice"),
    ]
    with pytest.raises(InputError, match="no concept <nosuch>"):
        futures[0].result(60)
    assert futures[1].result(60).instruction == "all the circles"
    with pytest.raises(InputError):
        service.submit_segment(image, "all the circles", user="Not A Slug")
