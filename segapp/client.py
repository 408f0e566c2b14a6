"""Two interchangeable clients of the application: in process (`LocalClient`) or over HTTP
(`RemoteClient`). The UI and `segapp bench serve` use these, so a UI on a CPU box can drive a
model on a GPU box with nothing else changed. Both return plain JSON-ready dicts (the REST
server's bodies) and raise segapp errors: InputError for bad input, Busy for a full queue.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from segapp.errors import InputError, SegappError
from segapp.scheduler import Busy


class Client(Protocol):
    def info(self) -> dict[str, Any]: ...
    def segment(self, image: Any, instruction: str, *, user: str | None = None) -> dict: ...
    def refine(
        self, image: Any, instruction: str, points: Sequence[tuple[float, float, int]], mask: int
    ) -> dict: ...
    def start_personalize(
        self,
        user: str,
        name: str,
        images: list,
        masks: list,
        *,
        steps: int | None = None,
        method: str = "lora",
    ) -> dict: ...
    def job(self, job_id: str, user: str) -> dict: ...
    def concepts(self, user: str) -> list[dict]: ...
    def delete_concept(self, user: str, name: str) -> None: ...
    def start_video(
        self, user: str, video: Path, instruction: str, *, merge: float | None, prune: float | None
    ) -> dict: ...
    def video_overlay(self, job: dict, user: str, dest: Path) -> Path | None: ...
    def batch_zip(self, data: bytes, instruction: str) -> bytes: ...


def png_bytes(image: Any) -> bytes:
    """An array / PIL image as PNG bytes (bytes and paths pass through as file contents)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


class LocalClient:
    """The Service in this process."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def info(self) -> dict[str, Any]:
        return self.service.info()

    def segment(self, image: Any, instruction: str, *, user: str | None = None) -> dict:
        result = self.service.segment(image, instruction, user=user)
        return result.to_dict()

    def refine(
        self, image: Any, instruction: str, points: Sequence[tuple[float, float, int]], mask: int
    ) -> dict:
        index = None if mask < 0 else mask
        return self.service.refine(image, instruction, points, mask_index=index).to_dict()

    def start_personalize(
        self,
        user: str,
        name: str,
        images: list,
        masks: list,
        *,
        steps: int | None = None,
        method: str = "lora",
    ) -> dict:
        job = self.service.start_personalize(user, name, images, masks, steps=steps, method=method)
        return job.to_dict()

    def job(self, job_id: str, user: str) -> dict:
        return self.service.job(job_id, user).to_dict()

    def concepts(self, user: str) -> list[dict]:
        return self.service.concepts(user)

    def delete_concept(self, user: str, name: str) -> None:
        self.service.delete_concept(user, name)

    def start_video(
        self, user: str, video: Path, instruction: str, *, merge: float | None, prune: float | None
    ) -> dict:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="segapp-video-"))
        job = self.service.start_video(user, video, instruction, out, merge=merge, prune=prune)
        return job.to_dict()

    def video_overlay(self, job: dict, user: str, dest: Path) -> Path | None:
        result = job.get("result") or {}
        path = result.get("overlay") or result.get("overlay_path")
        return Path(path) if path else None

    def batch_zip(self, data: bytes, instruction: str) -> bytes:
        return self.service.batch_zip(data, instruction)


class RemoteClient:
    """A `segapp serve` backend over HTTP (optionally with a bearer token)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 600.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _json(self, response: Any) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:200] or f"HTTP {response.status_code}"}
        if response.status_code < 400:
            return body
        message = (
            body.get("error", f"HTTP {response.status_code}") if isinstance(body, dict) else body
        )
        if response.status_code == 503:
            raise Busy(message, int(response.headers.get("retry-after", "1")))
        if response.status_code < 500:
            raise InputError(str(message))
        raise SegappError(str(message))

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            return self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SegappError(f"cannot reach the backend: {exc}", self.url) from None

    def info(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/version"))

    def segment(self, image: Any, instruction: str, *, user: str | None = None) -> dict:
        data = {"instruction": instruction, **({"user": user} if user else {})}
        files = {"image": ("image.png", png_bytes(image), "image/png")}
        return self._json(self._request("POST", "/v1/segment", data=data, files=files))

    def refine(
        self, image: Any, instruction: str, points: Sequence[tuple[float, float, int]], mask: int
    ) -> dict:
        import json

        data = {"instruction": instruction, "points": json.dumps(list(points)), "mask": str(mask)}
        files = {"image": ("image.png", png_bytes(image), "image/png")}
        return self._json(self._request("POST", "/v1/refine", data=data, files=files))["mask"]

    def start_personalize(
        self,
        user: str,
        name: str,
        images: list,
        masks: list,
        *,
        steps: int | None = None,
        method: str = "lora",
    ) -> dict:
        files = [
            ("images", (f"shot{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)
        ]
        files += [
            ("masks", (f"mask{i}.png", png_bytes(_mask_image(m)), "image/png"))
            for i, m in enumerate(masks)
        ]
        data = {"name": name, "user": user, "method": method}
        if steps:
            data["steps"] = str(steps)
        return self._json(self._request("POST", "/v1/personalize", data=data, files=files))

    def job(self, job_id: str, user: str) -> dict:
        return self._json(self._request("GET", f"/v1/jobs/{job_id}", params={"user": user}))

    def concepts(self, user: str) -> list[dict]:
        return self._json(self._request("GET", "/v1/concepts", params={"user": user}))["concepts"]

    def delete_concept(self, user: str, name: str) -> None:
        self._json(self._request("DELETE", f"/v1/concepts/{name}", params={"user": user}))

    def start_video(
        self, user: str, video: Path, instruction: str, *, merge: float | None, prune: float | None
    ) -> dict:
        data = {"instruction": instruction, "user": user, "merge": str(merge or 0)}
        if prune:
            data["prune"] = str(prune)
        files = {"video": (Path(video).name, Path(video).read_bytes(), "application/octet-stream")}
        return self._json(self._request("POST", "/v1/video", data=data, files=files))

    def video_overlay(self, job: dict, user: str, dest: Path) -> Path | None:
        response = self._request("GET", f"/v1/jobs/{job['id']}/overlay", params={"user": user})
        if response.status_code != 200:
            return None
        result = job.get("result") or {}
        path = dest / Path(result.get("overlay") or "overlay.mp4").name
        path.write_bytes(response.content)
        return path

    def batch_zip(self, data: bytes, instruction: str) -> bytes:
        files = {"archive": ("images.zip", data, "application/zip")}
        response = self._request(
            "POST", "/v1/batch", data={"instruction": instruction}, files=files
        )
        if response.status_code != 200:
            self._json(response)
        return response.content


def _mask_image(mask: Any) -> Any:
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        return (array * 255).astype(np.uint8)
    return array
