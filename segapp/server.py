"""REST backend (`segapp serve`): the Service over HTTP with FastAPI + uvicorn.

Endpoints (JSON unless noted; errors are `{"error": "<what> (<where>)"}`):

    GET    /health                     {"status": "ok", "model": ..., "queue": {...}}
    GET    /version                    {"segapp": "0.1.0", "model": ..., "device": ...}
    POST   /v1/segment                 multipart image + instruction [+ user] -> DESIGN.md JSON
    POST   /v1/refine                  multipart image + instruction + points (JSON) [+ mask]
    POST   /v1/batch                   multipart zip + instruction -> application/zip
    POST   /v1/personalize             multipart name + images[] + masks[] [+ steps] -> 202 job
    POST   /v1/video                   multipart video + instruction [+ merge, prune] -> 202 job
    GET    /v1/jobs/{id}               job state, progress 0..1, message, result or error
    GET    /v1/jobs/{id}/overlay       the overlay video of a finished video job
    GET    /v1/concepts                the caller's concepts
    DELETE /v1/concepts/{name}         delete one of them

Status codes: 400 bad input, 401 missing / wrong token, 404 unknown job, 413 upload too large,
503 + Retry-After when the model queue is full, 504 when a request waited too long, 500 for an
internal failure. With tokens configured (`--tokens FILE`, lines `token user`) every request
needs `Authorization: Bearer <token>` and the user is the token's; without, the `user` field
(default "local").
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segapp import __version__
from segapp.errors import InputError, ModelError, SegappError
from segapp.scheduler import Busy
from segapp.service import Service

DEFAULT_USER = "local"
MAX_UPLOAD_BYTES = 64 * 2**20


class UploadTooLarge(Exception):
    pass


class Unauthorized(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413 (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise UploadTooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except UploadTooLarge:
            await _too_large(self.limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        {"error": f"upload too large: limit is {limit // 2**20} MiB (upload)"}, status_code=413
    )


def error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, Busy):
        return JSONResponse(
            {"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, InputError):
        status = 404 if exc.where == "job" else 413 if "too large" in exc.what else 400
        return JSONResponse({"error": str(exc)}, status_code=status)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return JSONResponse({"error": "timed out waiting for the model (server)"}, status_code=504)
    if isinstance(exc, (ModelError, SegappError)):
        return JSONResponse({"error": str(exc)}, status_code=500)
    return JSONResponse(
        {"error": f"internal failure: {type(exc).__name__}: {exc} (server)"}, status_code=500
    )


def create_app(
    service: Service,
    *,
    tokens: dict[str, str] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    work_dir: Path | None = None,
) -> FastAPI:
    """The FastAPI app over `service`. tokens: bearer token -> user id (None: no auth)."""
    app = FastAPI(title="segapp", version=__version__)
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    work = Path(work_dir or tempfile.mkdtemp(prefix="segapp-serve-"))
    timeout = service.config.request_timeout_s

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(SegappError)
    async def on_segapp_error(request: Request, exc: SegappError) -> JSONResponse:
        return error_response(exc)

    def caller(request: Request, user: str | None) -> str:
        """The request's user: the token's when tokens are set, else the field or "local"."""
        if tokens:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in tokens:
                raise Unauthorized()
            return tokens[token.strip()]
        from segapp.personalize import validate_slug

        return validate_slug(user or DEFAULT_USER, "user")

    @app.exception_handler(Unauthorized)
    async def on_unauthorized(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": "missing or unknown bearer token (Authorization)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **service.info()}

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"segapp": __version__, **service.info()}

    @app.post("/v1/segment")
    async def segment(
        request: Request,
        image: Annotated[UploadFile, File()],
        instruction: Annotated[str, Form()] = "",
        user: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        who = caller(request, user)
        data = await image.read()
        future = await run_in_threadpool(service.submit_segment, data, instruction, user=who)
        result = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        return result.to_dict(image=image.filename)

    @app.post("/v1/refine")
    async def refine(
        request: Request,
        image: Annotated[UploadFile, File()],
        points: Annotated[str, Form()],
        instruction: Annotated[str, Form()] = "",
        mask: Annotated[int | None, Form()] = 0,
    ) -> dict[str, Any]:
        caller(request, None)
        try:
            parsed = [(float(x), float(y), int(lab)) for x, y, lab in json.loads(points)]
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"points must be a JSON list of [x, y, label]: {exc}", "points"
            ) from None
        data = await image.read()
        result = await run_in_threadpool(
            service.refine, data, instruction, parsed, mask_index=mask if mask != -1 else None
        )
        return {"mask": result.to_dict()}

    @app.post("/v1/batch")
    async def batch(
        request: Request,
        archive: Annotated[UploadFile, File()],
        instruction: Annotated[str, Form()] = "",
    ) -> Response:
        caller(request, None)
        data = await archive.read()
        out = await run_in_threadpool(service.batch_zip, data, instruction)
        return Response(out, media_type="application/zip")

    @app.post("/v1/personalize", status_code=202)
    async def personalize(
        request: Request,
        name: Annotated[str, Form()],
        images: Annotated[list[UploadFile], File()],
        masks: Annotated[list[UploadFile], File()],
        steps: Annotated[int | None, Form()] = None,
        method: Annotated[str, Form()] = "lora",
        user: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        who = caller(request, user)
        shots = [await f.read() for f in images]
        mask_data = [await f.read() for f in masks]
        job = await run_in_threadpool(
            service.start_personalize, who, name, shots, mask_data, steps=steps, method=method
        )
        return job.to_dict()

    @app.post("/v1/video", status_code=202)
    async def video(
        request: Request,
        video: Annotated[UploadFile, File()],
        instruction: Annotated[str, Form()] = "",
        merge: Annotated[float | None, Form()] = 0.7,
        prune: Annotated[float | None, Form()] = None,
        user: Annotated[str | None, Form()] = None,
    ) -> dict[str, Any]:
        who = caller(request, user)
        folder = Path(tempfile.mkdtemp(prefix="video-", dir=work))
        suffix = Path(video.filename or "clip.mp4").suffix.lower()[:8] or ".mp4"
        path = folder / f"input{suffix}"
        with path.open("wb") as fp:
            shutil.copyfileobj(video.file, fp)
        job = service.start_video(
            who, path, instruction, folder / "out", merge=merge if merge else None, prune=prune
        )
        return job.to_dict()

    @app.get("/v1/jobs/{job_id}")
    async def job(request: Request, job_id: str, user: str | None = None) -> dict[str, Any]:
        return service.job(job_id, caller(request, user)).to_dict()

    @app.get("/v1/jobs/{job_id}/overlay")
    async def job_overlay(request: Request, job_id: str, user: str | None = None) -> Response:
        found = service.job(job_id, caller(request, user))
        result = found.result or {}
        path = result.get("overlay") or result.get("overlay_path")
        if found.state != "done" or not path or not Path(path).is_file():
            raise InputError("this job has no overlay video (yet)", "job")
        return FileResponse(path, filename=Path(path).name)

    @app.get("/v1/concepts")
    async def concepts(request: Request, user: str | None = None) -> dict[str, Any]:
        who = caller(request, user)
        return {"user": who, "concepts": await run_in_threadpool(service.concepts, who)}

    @app.delete("/v1/concepts/{name}")
    async def delete_concept(request: Request, name: str, user: str | None = None) -> Any:
        who = caller(request, user)
        await run_in_threadpool(service.delete_concept, who, name)
        return {"deleted": name, "user": who}

    return app


def read_tokens(path: Path) -> dict[str, str]:
    """A tokens file: one `token user` pair per line (# comments); token -> user."""
    from segapp.personalize import validate_slug

    if not path.is_file():
        raise InputError("no such file", str(path))
    tokens = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"line {number}: expected 'token user'", str(path))
        tokens[parts[0]] = validate_slug(parts[1], "user")
    return tokens


def serve(
    service: Service,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens: dict[str, str] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> None:
    """Run the REST server until interrupted (the model loads before the port opens)."""
    import uvicorn

    service.bundle  # noqa: B018 - load now, so the first request is not the slow one
    app = create_app(service, tokens=tokens, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
