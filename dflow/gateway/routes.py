"""The HTTP routes: OpenAI's images and videos, models, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile

from distributed import Future, wait
from distributed.client import FutureCancelledError, FuturesCancelledError

from dflow.errors import InvalidRequest, ModelNotServed
from dflow.events import request_id
from dflow.gateway import media, params
from dflow.gateway.errors import APIError, bad_request, not_found
from dflow.gateway.state import Gateway

#: HTTP status of an answer nobody reads: the client went away (nginx's)
CLIENT_CLOSED = 499


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


#: A route's gateway (a FastAPI dependency)
Gw = Annotated[Gateway, Depends(_gateway)]


def install(app: FastAPI, auth: Any) -> None:
    """Add the routes to ``app``; ``/v1`` ones need ``auth`` (a dependency),
    except image URLs, which carry an unguessable id instead, as OpenAI's do."""
    guarded = [Depends(auth)]
    for method, path, endpoint in (
        ("POST", "/v1/images/generations", generate_images),
        ("POST", "/v1/videos", create_video),
        ("GET", "/v1/videos", list_videos),
        ("GET", "/v1/videos/{video_id}", retrieve_video),
        ("DELETE", "/v1/videos/{video_id}", delete_video),
        ("GET", "/v1/videos/{video_id}/content", video_content),
        ("GET", "/v1/models", list_models),
        ("GET", "/v1/models/{model:path}", retrieve_model),
    ):
        app.add_api_route(path, endpoint, methods=[method], dependencies=guarded)
    app.add_api_route("/v1/images/{image_id}/content", image_content, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])


# -- images ----------------------------------------------------------------------------


async def generate_images(request: Request, gw: Gw) -> Response:
    """``POST /v1/images/generations``: answers when the images are done; the
    ``n`` images (seeds ``seed``, ``seed + 1``, ...) share one text encoding."""
    body = params.parse(params.ImageGeneration, await _json(request))
    model = await gw.model_name(body.model, body, video=False)
    fields = params.request_fields(body, gw.settings.video_fps)
    url = body.response_format == "url"
    # the VAE worker's own PNGs serve b64 PNG; anything else is encoded after
    direct = body.output_format == "png" and not url
    requests, outputs = await gw.submit(
        model,
        fields,
        body,
        n=body.n,
        deadline=gw.settings.timeout,
        output_format="png" if direct else "pil",
    )
    first = requests[0]
    if direct:
        images = outputs
    else:
        images = [
            gw.client.submit(
                media.encode_image,
                output,
                body.output_format,
                body.output_compression,
                key=f"img_{uuid.uuid4().hex}",
            )
            for output in outputs
        ]
    values = await _until_done(
        gw, images, outputs, request, body, model, gather=not url
    )
    if values is None:
        return Response(status_code=CLIENT_CLOSED)
    if url:
        data = [await _publish_image(gw, image, body, request) for image in images]
    else:
        data = [
            {"b64_json": base64.b64encode(_image_bytes(v)).decode()} for v in values
        ]
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": data,
            "output_format": body.output_format,
            "size": f"{first.width}x{first.height}",
        }
    )


def _image_bytes(value: Any) -> bytes:
    """Encoded bytes, or the PNG of a :class:`dflow.Output`."""
    return value if isinstance(value, bytes) else value.encoded[0]


async def _publish_image(
    gw: Gateway, image: Future, body: params.ImageGeneration, request: Request
) -> dict[str, str]:
    key = str(image.key)
    created = int(time.time())
    await gw.store.add(
        {
            "id": key,
            "object": "image",
            "format": body.output_format,
            "created_at": created,
            "completed_at": created,
            "expires_at": created + int(gw.settings.result_ttl),
        },
        image,
    )
    return {"url": str(request.url_for("image_content", image_id=key))}


async def image_content(image_id: str, gw: Gw) -> Response:
    """``GET /v1/images/{id}/content``: an image answered as a URL, until it expires."""
    record = await gw.store.record(image_id) if image_id.startswith("img_") else None
    future = await gw.store.result(image_id) if record else None
    if record is None or future is None:
        raise not_found(f"no image {image_id!r} (URLs expire)", code="image_not_found")
    data = await future
    return Response(data, media_type=media.MEDIA_TYPES[record["format"]])


async def _until_done(
    gw: Gateway,
    futures: list[Future],
    upstream: list[Future],
    request: Request,
    body: params.ImageGeneration,
    model: str,
    gather: bool,
) -> list[Any] | None:
    """Wait for ``futures`` (their values if ``gather``) unless the HTTP client
    goes away first: then cancel them and their ``upstream``, and return None.
    Their errors come back as HTTP errors."""
    if gather:
        work = asyncio.ensure_future(gw.client.gather(futures))
    else:
        work = asyncio.ensure_future(_all_finished(futures))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        await gw.client.cancel([*futures, *upstream], reason="client-disconnected")
        return None
    try:
        return work.result()
    except (FutureCancelledError, FuturesCancelledError) as error:
        raise _cancelled(error) from None
    except InvalidRequest as error:
        raise params.invalid(error, body) from None
    except ModelNotServed as error:
        raise await gw.not_served(model, error) from None
    except Exception as error:
        raise APIError(
            500,
            f"generation failed: {type(error).__name__}: {error}",
            type="server_error",
            code="generation_failed",
        ) from None


async def _all_finished(futures: list[Future]) -> list[Future]:
    await wait(futures)
    for future in futures:
        if future.status != "finished":
            await future.result()  # raises its error
    return futures


async def _disconnected(request: Request) -> None:
    """Returns when the HTTP client disconnects (its body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancelled(error: FutureCancelledError | FuturesCancelledError) -> APIError:
    if isinstance(error, FutureCancelledError):
        reasons = {error.reason}
    else:
        reasons = {group.reason for group in error.error_groups}
    if "deadline-exceeded" in reasons:
        return APIError(
            504,
            f"not done within dflow.gateway.timeout; its work was cancelled ({error})",
            type="server_error",
            code="timeout",
        )
    return APIError(
        503,
        f"the request was cancelled in the cluster: {error}",
        type="server_error",
        code="cancelled",
    )


# -- videos ----------------------------------------------------------------------------


async def create_video(request: Request, gw: Gw) -> Response:
    """``POST /v1/videos`` (JSON or multipart): submits the job and answers at once."""
    data, reference = await _video_body(request)
    body = params.parse(params.VideoGeneration, data)
    model = await gw.model_name(body.model, body, video=True)
    fields = params.request_fields(body, gw.settings.video_fps)
    extra: dict[str, Any] = {"output_format": "np"}
    if reference is not None:
        # the model's family says whether it takes one (InvalidRequest "image")
        extra["image"] = params.input_image(reference)
    (job,), (output,) = await gw.submit(model, fields, body, **extra)
    key = f"video_{uuid.uuid4().hex}"
    result = gw.client.submit(
        media.encode_video, output, gw.settings.video_fps, key=key
    )
    record = {
        "id": key,
        "object": "video",
        "model": model,
        "prompt": job.prompt,
        "size": f"{job.width}x{job.height}",
        "seconds": _seconds(job.num_frames or 1, gw.settings.video_fps),
        "num_frames": job.num_frames,
        "num_inference_steps": job.steps,
        "seed": job.seed,
        "request": request_id(output.key),
        "created_at": int(time.time()),
        # the list's order: created_at counts whole seconds
        "created": time.time(),
        "completed_at": None,
        "expires_at": None,
    }
    await gw.store.add(record, result)
    gw.watch(key, result)
    return _video_answer(gw, _video(record, "waiting", None, None))


async def _video_body(request: Request) -> tuple[dict[str, Any], Any]:
    """The fields of a JSON or multipart body, and its ``input_reference``
    (an upload's bytes, or the JSON value)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        data: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data[name] = await value.read()
            else:
                data[name] = value
    else:
        data = await _json(request)
        if not isinstance(data, dict):
            raise bad_request(None, "the body must be a JSON object")
    reference = data.pop("input_reference", None)
    return data, reference


async def retrieve_video(video_id: str, gw: Gw) -> Response:
    """``GET /v1/videos/{id}``: the job, its status and progress."""
    return _video_answer(gw, await _video_of(gw, video_id))


async def list_videos(
    gw: Gw,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    """``GET /v1/videos``: jobs by creation time, a page at a time (``after`` the
    last id of the previous page)."""
    records = sorted(
        await gw.store.records("video_"),
        key=lambda r: (r["created"], r["id"]),
        reverse=order == "desc",
    )
    if after is not None:
        ids = [r["id"] for r in records]
        if after not in ids:
            raise not_found(f"after: no video {after!r}", param="after")
        records = records[ids.index(after) + 1 :]
    page = records[:limit]
    states = await gw.store.states(r["id"] for r in page)
    data = [await _video_view(gw, record, states.get(record["id"])) for record in page]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(records) > limit,
        }
    )


async def delete_video(video_id: str, gw: Gw) -> Response:
    """``DELETE /v1/videos/{id}``: stops the job's work (its denoising loop ends
    at the next step), frees its memory and forgets it."""
    if not video_id.startswith("video_") or not await gw.store.drop(
        video_id, reason="deleted"
    ):
        raise _no_video(video_id)
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


async def video_content(
    video_id: str,
    gw: Gw,
    variant: str = "video",
) -> Response:
    """``GET /v1/videos/{id}/content``: the MP4, or ``variant=thumbnail`` its
    first frame as a PNG."""
    if variant not in ("video", "thumbnail"):
        raise bad_request(
            "variant", f"variant: {variant!r} is not one of video, thumbnail"
        )
    video = await _video_of(gw, video_id)
    if video["status"] != "completed":
        raise APIError(
            409,
            f"video {video_id} is {video['status']}, not completed",
            code="video_not_ready",
        )
    future = await gw.store.result(video_id)
    if future is None:
        raise _no_video(video_id)
    result = await future
    if variant == "thumbnail":
        return Response(result["thumbnail"], media_type="image/png")
    return Response(result["video"], media_type="video/mp4")


async def _video_of(gw: Gateway, video_id: str) -> dict[str, Any]:
    record = await gw.store.record(video_id) if video_id.startswith("video_") else None
    if record is None:
        raise _no_video(video_id)
    state = (await gw.store.states([video_id]))[video_id]
    if state is None:
        raise _no_video(video_id)
    return await _video_view(gw, record, state)


async def _video_view(
    gw: Gateway, record: dict[str, Any], state: str | None
) -> dict[str, Any]:
    """The OpenAI video object of a job whose task is in ``state``."""
    error = None
    if state in ("memory", "erred"):
        record = await gw.ended(record["id"]) or record
    if state == "erred":
        future = await gw.store.result(record["id"])
        exception = await future.exception() if future is not None else None
        error = {
            "code": type(exception).__name__ if exception else "failed",
            "message": str(exception) if exception else "the job failed",
        }
    return _video(record, state, gw.progress.step(record["request"]), error)


def _video(
    record: dict[str, Any],
    state: str | None,
    step: tuple[int, int] | None,
    error: dict[str, str] | None,
) -> dict[str, Any]:
    if state == "memory":
        status, progress = "completed", 100
    elif state == "erred" or state is None:
        status, progress = "failed", 0
    elif step is not None and step[0] > 0:
        # denoising dominates; decoding and the MP4 are the last percent
        status, progress = "in_progress", min(99, 100 * step[0] // max(step[1], 1))
    else:
        status, progress = "queued", 0
    shown = ("id", "object", "model", "prompt", "size", "seconds", "created_at")
    return {
        **{name: record.get(name) for name in shown},
        "status": status,
        "progress": progress,
        "completed_at": record.get("completed_at"),
        "expires_at": record.get("expires_at"),
        "error": error,
        "num_frames": record.get("num_frames"),
        "num_inference_steps": record.get("num_inference_steps"),
        "seed": record.get("seed"),
    }


def _video_answer(gw: Gateway, video: dict[str, Any]) -> Response:
    headers = {}
    if video["status"] in ("queued", "in_progress"):
        headers["openai-poll-after-ms"] = str(gw.settings.poll_after_ms)
    return JSONResponse(video, headers=headers)


def _seconds(frames: int, fps: int) -> str:
    return f"{(frames - 1) / fps:g}"


def _no_video(video_id: str) -> APIError:
    return not_found(f"no video {video_id!r}", param="video_id", code="video_not_found")


# -- models, health, metrics -----------------------------------------------------------


async def list_models(gw: Gw) -> Response:
    """``GET /v1/models``: the models the cluster serves, with their pools."""
    return JSONResponse({"object": "list", "data": await _models(gw)})


async def retrieve_model(model: str, gw: Gw) -> Response:
    for entry in await _models(gw):
        if entry["id"] == model:
            return JSONResponse(entry)
    raise not_found(f"model: no model {model!r}", param="model", code="model_not_found")


async def _models(gw: Gateway) -> list[dict[str, Any]]:
    import dflow

    pools = await gw.pools()
    known = await gw.run(dflow.models, gw.client)
    return [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "dflow",
            "ready": _ready(pools.get(model, {})),
            "pools": {
                stage: {"workers": workers}
                for stage, workers in sorted(pools.get(model, {}).items())
            },
        }
        for model in sorted(set(pools) | set(known))
    ]


def _ready(stages: dict[str, list[str]]) -> bool:
    return "all" in stages or all(s in stages for s in ("encoder", "dit", "vae"))


async def health(gw: Gw) -> Response:
    """200 when the scheduler answers and some model has all its pools."""
    pools = await gw.pools()
    ready = sorted(m for m, stages in pools.items() if _ready(stages))
    if not ready:
        raise APIError(
            503,
            f"no model has workers for all its stages (serving: {json.dumps(pools)})",
            type="server_error",
            code="no_model_ready",
        )
    return JSONResponse({"status": "ok", "models": ready})


async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry),
        media_type=CONTENT_TYPE_LATEST,
    )


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(None, f"the body is not JSON: {error}") from None
