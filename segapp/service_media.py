"""The Service's video and folder jobs: `segment_video`, `start_video`, `batch`, `batch_zip`.

A mixin of `segapp.service.Service`, kept apart from the image requests: each job runs on the
Service's one model thread (its `queue`), video through segapp.video and folders through
segapp.batch, both imported on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from segapp.images import check_instruction
from segapp.jsonable import as_dict
from segapp.scheduler import Progress

if TYPE_CHECKING:
    from segapp.build import Bundle
    from segapp.predictor import Segmenter
    from segapp.scheduler import Job, JobTable, ModelQueue
    from segapp.service import ServiceConfig


class _Host(Protocol):
    """What the jobs need of the Service they are mixed into."""

    config: ServiceConfig
    jobs: JobTable
    queue: ModelQueue[Any]

    @property
    def bundle(self) -> Bundle: ...

    @property
    def segmenter(self) -> Segmenter: ...


class MediaJobs:
    """Video and folder segmentation on the host Service's model."""

    # ---- video -----------------------------------------------------------------------------
    def segment_video(
        self: _Host,
        video: Path,
        instruction: str,
        out_dir: Path,
        *,
        merge: float | None = 0.7,
        prune: float | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Segment every frame of `video` (see segapp.video); answer, files and token stats."""
        text = check_instruction(instruction)
        future = self.queue.call(
            lambda: _video(self.bundle, video, text, out_dir, merge, prune, progress)
        )
        return future.result()

    def start_video(
        self: _Host,
        user: str,
        video: Path,
        instruction: str,
        out_dir: Path,
        *,
        merge: float | None = 0.7,
        prune: float | None = None,
    ) -> Job:
        """`segment_video` as a job the caller polls (see `Service.job`)."""
        text = check_instruction(instruction)
        return self.jobs.start(
            self.queue,
            "video",
            user,
            lambda progress: _video(self.bundle, video, text, out_dir, merge, prune, progress),
        )

    # ---- batch -----------------------------------------------------------------------------
    def batch(self: _Host, input_dir: Path, instruction: str, out_dir: Path, **job: Any) -> Any:
        """`segapp batch` on this service's model (one model in memory); returns its Summary."""
        from segapp.batch import BatchJob
        from segapp.batch.runner import run_batch

        spec = BatchJob(
            input_dir=Path(input_dir),
            out_dir=Path(out_dir),
            prompt=check_instruction(instruction),
            model=self.config.model,
            max_pixels=self.config.max_pixels,
            max_new_tokens=self.config.max_new_tokens,
            progress=False,
            **job,
        )
        future = self.queue.call(lambda: run_batch(spec, segmenter=self.segmenter))
        return future.result()

    def batch_zip(
        self: _Host, data: bytes, instruction: str, *, formats: tuple[str, ...] = ("png", "coco")
    ) -> bytes:
        """A zip of images in, a zip of results out (masks/, coco.json, results.jsonl)."""
        import tempfile

        from segapp.archive import pack_folder, unpack_images

        text = check_instruction(instruction)
        with tempfile.TemporaryDirectory(prefix="segapp-batch-") as tmp:
            unpack_images(data, Path(tmp) / "in")
            MediaJobs.batch(self, Path(tmp) / "in", text, Path(tmp) / "out", formats=formats)
            return pack_folder(Path(tmp) / "out")


def _video(
    bundle: Bundle,
    video: Path,
    text: str,
    out_dir: Path,
    merge: float | None,
    prune: float | None,
    progress: Progress | None,
) -> dict[str, Any]:
    from segapp.video import VideoSegmenter

    result = VideoSegmenter(bundle).run(
        video, text, out_dir, merge=merge, prune=prune, progress=progress
    )
    return as_dict(result)
