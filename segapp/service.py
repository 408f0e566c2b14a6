"""The one application facade: CLI, REST server and UI all call a `Service`.

A Service owns the model (loaded once, lazily, on the best device), the bounded queue in front
of it (segapp.scheduler), the per-user concept store and the long-running jobs. Segment
requests that arrive together are decoded as one batch (`Segmenter.encode_batch` +
`predict_batch`); an image's encoding and a query's decoding do not depend on the batch, so
a request gets the same masks alone, in a crowd, from the CLI, over REST or from the UI.
Personalization and video delegate to segapp.personalize and segapp.video (imported on use);
the video and folder jobs live in segapp.service_media.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segapp.errors import InputError
from segapp.images import as_rgb, check_instruction, mask_from_array
from segapp.jsonable import as_dict
from segapp.scheduler import Job, JobTable, ModelQueue, Progress
from segapp.service_media import MediaJobs

if TYPE_CHECKING:
    from segapp.build import Bundle
    from segapp.predictor import ImageCache, MaskResult, Prepared, Result, Segmenter

CONCEPT_REF = re.compile(r"<([a-z0-9][a-z0-9_-]{0,47})>")  # how an instruction names a concept


@dataclass(frozen=True)
class ServiceConfig:
    """How a Service loads its model and guards it."""

    model: str = "tiny"  # preset name or weights directory
    device: str = "auto"  # auto: cuda when present, else cpu
    precision: str | None = "auto"  # auto: bf16 (fp16 without bf16) on cuda, as stored on cpu
    max_pixels: int = 16_000_000  # larger images are refused
    max_new_tokens: int = 48  # answer length limit
    max_pending: int = 16  # queued requests before `Busy` (HTTP 503)
    max_batch: int = 8  # segment requests decoded together
    max_jobs: int = 4  # personalize / video jobs queued or running at once
    image_cache: int = 8  # encoded images kept for repeated requests (point refinement)
    concepts_root: Path | None = None  # per-user adapters; default <weights>/adapters
    request_timeout_s: float = 300.0  # a segment call waits at most this long


@dataclass
class SegmentRequest:
    """One queued segment call (image already decoded and prepared off the model thread)."""

    image: np.ndarray  # H x W x 3 uint8
    prepared: Prepared
    instruction: str
    user: str | None


class Service(MediaJobs):
    """segment / refine / personalize / concepts / video / batch over one lazily loaded model
    (video and batch: segapp.service_media)."""

    def __init__(self, config: ServiceConfig | None = None, *, bundle: Bundle | None = None):
        self.config = config or ServiceConfig()
        self._bundle = bundle
        self._segmenter: Segmenter | None = None
        self._load_lock = threading.Lock()
        self._images: OrderedDict[tuple[str, str], ImageCache] = OrderedDict()
        self.jobs = JobTable(max_active=self.config.max_jobs)
        self.queue: ModelQueue[SegmentRequest] = ModelQueue(
            self._run_segments,
            max_pending=self.config.max_pending,
            max_batch=self.config.max_batch,
        )

    # ---- model -----------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle:
        """The model, loaded on first use (never at import or construction)."""
        if self._bundle is None:
            with self._load_lock:
                if self._bundle is None:
                    from segapp.build import LoadOptions, load_model
                    from segapp.precision import auto_placement

                    device, precision = auto_placement(self.config.device, self.config.precision)
                    self._bundle = load_model(
                        self.config.model, device=device, options=LoadOptions(precision=precision)
                    )
        return self._bundle

    @property
    def segmenter(self) -> Segmenter:
        """A PersonalSegmenter (per-request concept adapters) when segapp.personalize is there."""
        if self._segmenter is None:
            bundle = self.bundle
            with self._load_lock:
                if self._segmenter is None:
                    self._segmenter = self._make_segmenter(bundle)
        return self._segmenter

    def _make_segmenter(self, bundle: Bundle) -> Segmenter:
        try:
            from segapp.personalize import PersonalSegmenter
        except ImportError:  # personalization not installed: the base model only
            from segapp.predictor import Segmenter

            return Segmenter(bundle, max_new_tokens=self.config.max_new_tokens)
        return PersonalSegmenter(
            bundle, self.concept_store, max_new_tokens=self.config.max_new_tokens
        )

    @property
    def concept_store(self) -> Any:
        from segapp.build import weights_root
        from segapp.personalize import ConceptStore

        return ConceptStore(self.config.concepts_root or weights_root() / "adapters")

    def info(self) -> dict[str, Any]:
        """Model name, device, dtype and queue state (for /health and /version)."""
        loaded = self._bundle is not None
        out: dict[str, Any] = {"model": self.config.model, "loaded": loaded}
        if loaded:
            param = next(self.bundle.model.parameters())
            out.update(device=str(param.device), dtype=str(param.dtype).replace("torch.", ""))
        out["queue"] = {"pending": self.queue.pending(), "max_pending": self.queue.max_pending}
        return out

    def close(self) -> None:
        self.queue.close()

    # ---- segment ---------------------------------------------------------------------------
    def image_array(self, image: Any) -> np.ndarray:
        """Encoded bytes, a path, a PIL image or an array -> H x W x 3 uint8 (size checked)."""
        return as_rgb(image, max_pixels=self.config.max_pixels)

    def submit_segment(self, image: Any, instruction: str, *, user: str | None = None) -> Future:
        """Check and decode the input here, queue the model work; Future[Result].

        Raises InputError for bad input and scheduler.Busy when the queue is full.
        """
        text = check_instruction(instruction)
        if user is not None:
            from segapp.personalize import validate_slug

            validate_slug(user, "user")
        rgb = self.image_array(image)
        prepared = self.segmenter.prepare(rgb)
        return self.queue.submit(SegmentRequest(rgb, prepared, text, user))

    def segment(self, image: Any, instruction: str, *, user: str | None = None) -> Result:
        """Answer `instruction` about `image`: one mask per target (see predictor.Result)."""
        future = self.submit_segment(image, instruction, user=user)
        return future.result(timeout=self.config.request_timeout_s)

    def _cached(self, requests: Sequence[SegmentRequest]) -> list[ImageCache]:
        """Encodings of the requests' images, encoding only those not in the small LRU."""
        seg = self.segmenter
        keys = [("", r.prepared.key) for r in requests]
        missing = {k: r.prepared for k, r in zip(keys, requests, strict=True)}
        missing = {k: p for k, p in missing.items() if k not in self._images}
        for key, cache in zip(missing, seg.encode_batch(list(missing.values())), strict=True):
            self._images[key] = cache
        found = []
        for key in keys:
            self._images.move_to_end(key)
            found.append(self._images[key])
        while len(self._images) > max(self.config.image_cache, len(set(keys))):
            self._images.popitem(last=False)
        return found

    def _run_segments(self, requests: list[SegmentRequest]) -> list[Any]:
        """On the model thread: base-model requests as one batch, concept requests one by one.

        Each request's failure (bad instruction, unknown concept) is its own answer.
        """
        seg = self.segmenter
        answers: list[Any] = [None] * len(requests)
        base: list[int] = []
        named: list[int] = []
        for i, req in enumerate(requests):
            try:
                seg.prompt_ids(req.instruction, **self._user_kw(req))
            except InputError as exc:
                answers[i] = exc
                continue
            (named if CONCEPT_REF.search(req.instruction) else base).append(i)
        caches = dict(
            zip(base + named, self._cached([requests[i] for i in base + named]), strict=True)
        )
        if base:
            queries = [(caches[i], requests[i].instruction) for i in base]
            for i, result in zip(base, seg.predict_batch(queries), strict=True):
                answers[i] = result
        for i in named:
            query = [(caches[i], requests[i].instruction)]
            try:
                answers[i] = seg.predict_batch(query, **self._user_kw(requests[i]))[0]
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                answers[i] = exc
        return answers

    def _user_kw(self, req: SegmentRequest) -> dict[str, Any]:
        """`user=` for a PersonalSegmenter (a plain Segmenter takes none)."""
        if req.user is None or not hasattr(self.segmenter, "concept_for"):
            return {}
        return {"user": req.user}

    # ---- point refinement ------------------------------------------------------------------
    def refine(
        self,
        image: Any,
        instruction: str,
        points: Sequence[tuple[float, float, int]],
        *,
        mask_index: int | None = 0,
    ) -> MaskResult:
        """Refine mask `mask_index` of `instruction`'s answer with clicked points through SAM.

        points: (x, y, label) in original image pixels, label 1 = positive, 0 = negative.
        mask_index None (or an answer without masks): the points alone prompt SAM.
        """
        from segapp.refine import check_points

        text = check_instruction(instruction)
        check_points(points)
        rgb = self.image_array(image)
        check_points(points, size=rgb.shape[:2])
        prepared = self.segmenter.prepare(rgb)
        req = SegmentRequest(rgb, prepared, text, None)
        future = self.queue.call(lambda: self._refine(req, points, mask_index))
        return future.result(timeout=self.config.request_timeout_s)

    def _refine(
        self, req: SegmentRequest, points: Sequence[tuple[float, float, int]], index: int | None
    ) -> MaskResult:
        from segapp.refine import refine_mask

        cache = self._cached([req])[0]
        return refine_mask(self.segmenter, cache, req.instruction, points, index)

    # ---- personalization -------------------------------------------------------------------
    def personalize(
        self,
        user: str,
        name: str,
        images: Sequence[Any],
        masks: Sequence[Any],
        *,
        steps: int | None = None,
        method: str = "lora",
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Fit concept `name` for `user` from 1-5 (image, mask) shots; its ConceptInfo as a dict."""
        shots = self._shots(images, masks)
        future = self.queue.call(lambda: self._fit(user, name, shots, steps, method, progress))
        return future.result()

    def start_personalize(
        self,
        user: str,
        name: str,
        images: Sequence[Any],
        masks: Sequence[Any],
        *,
        steps: int | None = None,
        method: str = "lora",
    ) -> Job:
        """`personalize` as a job: returns at once; poll `job(id, user)` for progress."""
        from segapp.personalize import validate_slug

        validate_slug(user, "user")
        validate_slug(name, "name")
        shots = self._shots(images, masks)
        return self.jobs.start(
            self.queue,
            "personalize",
            user,
            lambda progress: self._fit(user, name, shots, steps, method, progress),
        )

    def _shots(
        self, images: Sequence[Any], masks: Sequence[Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Decode shots (bytes, paths, PIL or arrays) and check them before any model work."""
        from segapp.personalize.fit import MAX_SHOTS, check_shots

        if not 1 <= len(images) <= MAX_SHOTS:  # before decoding a flood of images
            raise InputError(f"give 1 to {MAX_SHOTS} shots, got {len(images)}", "images")
        rgbs = [self.image_array(im) for im in images]
        bools = [
            mask_from_array(m if isinstance(m, np.ndarray) else self.image_array(m)) for m in masks
        ]
        shots = check_shots(rgbs, bools)
        return [img for img, _ in shots], [m for _, m in shots]

    def _fit(
        self,
        user: str,
        name: str,
        shots: tuple[list[np.ndarray], list[np.ndarray]],
        steps: int | None,
        method: str,
        progress: Progress | None,
    ) -> dict[str, Any]:
        from segapp.personalize import fit_concept

        images, masks = shots
        info = fit_concept(
            self.bundle,
            self.concept_store,
            user,
            name,
            images,
            masks,
            steps=steps,
            method=method,
            progress=progress,
        )
        self._forget_adapter(user, name)
        return as_dict(info)

    def _forget_adapter(self, user: str, name: str) -> None:
        """A refitted or deleted concept must not be served from the loaded-adapter cache."""
        forget = getattr(self._segmenter, "forget", None)
        if callable(forget):
            forget(user, name)

    def concepts(self, user: str) -> list[dict[str, Any]]:
        """The user's concepts (only theirs)."""
        return [as_dict(info) for info in self.concept_store.list(user)]

    def delete_concept(self, user: str, name: str) -> None:
        """Delete one of the user's concepts; InputError if they have no such concept."""

        def delete() -> None:
            self.concept_store.delete(user, name)
            self._forget_adapter(user, name)

        self.queue.call(delete).result(timeout=self.config.request_timeout_s)

    # ---- jobs ------------------------------------------------------------------------------
    def job(self, job_id: str, user: str) -> Job:
        return self.jobs.get(job_id, user)
