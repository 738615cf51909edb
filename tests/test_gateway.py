"""The OpenAI-compatible gateway, end to end.

Real ``dask scheduler`` and ``dflow-worker`` processes on 127.0.0.1 serve
tiny-flux (images) and tiny-wan (video), one worker per stage each; ``dflow
serve`` runs as real subprocesses in front of them. The official ``openai``
client drives the happy paths, ``httpx`` the errors. One cluster serves the
module; tiny-wan admits one request at a time (so a second gateway that does
not wait for room answers 429), tiny-flux has no limit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from distributed import Client, get_task_stream

import dflow
from dflow.client import encoding_key
from dflow.events import TOPIC, request_id
from dflow.gateway.jobs import JobStore
from dflow.testing import (
    ServiceProcess,
    gateway_process,
    poll,
    scheduler_process,
    wait_for_pools,
    worker_processes,
)

pytestmark = [
    # real scheduler, worker and gateway processes
    pytest.mark.slow,
    # the openai client warns on every videos call that OpenAI's Sora API will close
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
    # the first test's setup starts the module's six worker processes
    pytest.mark.timeout(1200),
]

IMAGE, VIDEO = "tiny-flux", "tiny-wan"
STAGES = ("encoder", "dit", "vae")
KEYS = ("sk-first-key", "sk-second-key")
SCHEDULER_ENV = {
    "DASK_DFLOW__ELASTIC__ENABLED": "False",
    "DASK_DFLOW__ADMISSION__MAX_OUTSTANDING": repr({VIDEO: 1}),
    "DASK_DFLOW__SCHEDULER__CHECK_INTERVAL": "200ms",
    # every step a progress event: the cancellation tests count them
    "DASK_DFLOW__RUNTIME__PROGRESS_INTERVAL": "0",
}
#: The main gateway waits for room under tiny-wan's limit; the strict one does
#: not (429), gives up on images after a second (504) and on an unserved model
#: at once (503)
GATEWAY_ENV = {
    "DASK_DFLOW__GATEWAY__POLL_AFTER": "100ms",
    "DASK_DFLOW__GATEWAY__MAX_BODY_SIZE": "256KiB",
    "DASK_DFLOW__ADMISSION__TIMEOUT": "120s",
}
STRICT_ENV = {
    **GATEWAY_ENV,
    "DASK_DFLOW__ADMISSION__TIMEOUT": "0s",
    "DASK_DFLOW__GATEWAY__TIMEOUT": "1s",
    "DASK_DFLOW__GATEWAY__RETRY_AFTER": "3s",
    "DASK_DFLOW__CLIENT__MODEL_TIMEOUT": "0.5s",
}
#: Seconds a wait for the cluster may take on a busy machine (liveness, not speed)
PATIENCE = 300
#: A video whose denoising takes many seconds (it is deleted, not awaited)
LONG_VIDEO = {"size": "128x128", "num_frames": 33, "num_inference_steps": 200}


@pytest.fixture(scope="module")
def cluster(tiny_folders) -> Iterator[Client]:
    """A client of the module's cluster; ``worker(stage, model)`` finds a worker."""
    layout = [(stage, model) for model in (IMAGE, VIDEO) for stage in STAGES]
    with (
        scheduler_process(env=SCHEDULER_ENV) as address,
        worker_processes(address, layout, env=SCHEDULER_ENV) as workers,
        Client(address) as client,
    ):
        wait_for_pools(
            client,
            {IMAGE: STAGES, VIDEO: STAGES},
            timeout=900,
            processes=[address.process, *workers],
        )
        WORKERS.update({(w.stage, w.model): w for w in workers})
        yield client
    WORKERS.clear()


#: The module cluster's worker processes by (stage, model)
WORKERS: dict[tuple[str | None, str | None], ServiceProcess] = {}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text(f"# gateway keys\n{KEYS[0]}\n\n{KEYS[1]}  # the other\n")
    return path


@contextlib.contextmanager
def serving(
    cluster: Client, keys_file: Path, env: dict[str, str], log_dir: Path
) -> Iterator[str]:
    """``dflow serve`` of the module's cluster; yields its base URL."""
    with gateway_process(
        cluster.scheduler.address,
        args=["--api-keys", str(keys_file)],
        env=env,
        log_dir=log_dir,
        timeout=PATIENCE,
    ) as (url, _):
        yield url


@pytest.fixture(scope="module")
def gateway(cluster, keys_file, tmp_path_factory) -> Iterator[str]:
    with serving(cluster, keys_file, GATEWAY_ENV, tmp_path_factory.mktemp("gw")) as url:
        yield url


@pytest.fixture(scope="module")
def strict(cluster, keys_file, tmp_path_factory) -> Iterator[str]:
    with serving(cluster, keys_file, STRICT_ENV, tmp_path_factory.mktemp("st")) as url:
        yield url


def api(url: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def http(url: str, key: str | None = KEYS[1]) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def ran(stream: Any, prefix: str) -> int:
    """Tasks of a task stream whose keys start with ``prefix``."""
    return sum(1 for record in stream.data if str(record["key"]).startswith(prefix))


def executing(client: Client, worker: ServiceProcess) -> list[str]:
    def keys(dask_worker):
        return [str(ts.key) for ts in dask_worker.state.executing]

    (address,) = worker.addresses(client)
    return client.run(keys, workers=[address])[address]


def steps_reported(client: Client, request: str) -> list[int]:
    return [m["step"] for _, m in client.get_events(TOPIC) if m["request"] == request]


def stopped_early(client: Client, request: str, steps: int) -> bool:
    """Whether a denoise stopped before its end: one that ran to it reported
    each of its steps but the last (the module's progress interval is 0)."""
    return len(steps_reported(client, request)) < steps - 1


def job_keys(client: Client, request: str, job: str) -> list[str]:
    def keys(dask_scheduler):
        return [str(k) for k in dask_scheduler.tasks]

    return [k for k in client.run_on_scheduler(keys) if request in k or k == job]


# -- images ----------------------------------------------------------------------------


def test_images_as_b64_share_one_encoding_and_match_generate(cluster, gateway):
    with get_task_stream(client=cluster) as stream:
        answer = api(gateway).images.generate(
            model=IMAGE,
            prompt="a red fox in fresh snow",
            n=2,
            size="64x48",
            response_format="b64_json",
            extra_body={"seed": 11, "num_inference_steps": 3},
        )
    assert [d.url for d in answer.data] == [None, None]
    images = [png_pixels(base64.b64decode(d.b64_json)) for d in answer.data]
    assert [i.shape for i in images] == [(48, 64, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # seeds 11 and 12
    # the two requests ran one encode task between them
    assert (ran(stream, "denoise-"), ran(stream, "encode-")) == (2, 1)
    # same pixels as each request alone, in this process (its own encoding)
    for seed, image in zip((11, 12), images, strict=True):
        request = dflow.Request(
            model=IMAGE,
            prompt="a red fox in fresh snow",
            width=64,
            height=48,
            steps=3,
            seed=seed,
        )
        alone = np.asarray(dflow.generate(request).images[0].convert("RGB"))
        # batched encodes are exact; the VAE may have decoded the two in one
        # batch, which rounds differently (as test_serving documents)
        assert np.abs(image.astype(int) - alone).max() <= 1


def test_requests_in_flight_together_share_encodings(cluster):
    """dflow.map: one encode task per distinct prompt; pixels as if unshared."""
    requests = [
        dflow.Request(model=IMAGE, prompt=prompt, steps=2, seed=seed)
        for prompt, seed in (("a lighthouse", 1), ("a lighthouse", 2), ("a harbor", 1))
    ]
    keys = [encoding_key(r) for r in requests]
    assert keys[0] == keys[1] != keys[2]
    with get_task_stream(client=cluster) as stream:
        outputs = cluster.gather(dflow.map(cluster, requests))
    assert (ran(stream, "denoise-"), ran(stream, "encode-")) == (3, 2)
    for request, output in zip(requests, outputs, strict=True):
        alone = np.asarray(dflow.generate(request).images[0]).astype(int)
        # batched encodes are exact; batched decodes round differently
        bound = 0 if output.timings["decode_batch"] == 1 else 1
        assert np.abs(np.asarray(output.images[0]) - alone).max() <= bound


def test_images_as_urls_served_by_the_gateway(gateway):
    answer = api(gateway).images.generate(
        model=IMAGE,
        prompt="a bowl of ramen",
        n=2,
        size="64x64",
        response_format="url",
        output_format="jpeg",
        extra_body={"num_inference_steps": 2},
    )
    assert [d.b64_json for d in answer.data] == [None, None]
    with http(gateway, key=None) as anyone:  # the URL is the capability
        for item in answer.data:
            response = anyone.get(item.url)
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/jpeg"
            image = Image.open(io.BytesIO(response.content))
            assert (image.format, image.size) == ("JPEG", (64, 64))
        missing = anyone.get(answer.data[0].url.replace("img_", "img_0"))
        assert missing.status_code == 404


def test_results_expire(cluster, gateway):
    answer = api(gateway).images.generate(
        model=IMAGE, prompt="a fox", response_format="url", extra_body={"seed": 2}
    )
    url = answer.data[0].url
    assert httpx.get(url).status_code == 200

    async def expire_all() -> int:
        """What a gateway's periodic sweep does, an hour ahead."""
        async with Client(cluster.scheduler.address, asynchronous=True) as client:
            return await JobStore(client).expire(["img_"], now=time.time() + 3600)

    assert asyncio.run(expire_all()) >= 1
    assert httpx.get(url).status_code == 404


def test_disconnecting_cancels_an_images_call(cluster, gateway):
    dit = WORKERS["dit", IMAGE]
    body = json.dumps(
        {
            "model": IMAGE,
            "prompt": "a slow sunset",
            "size": "512x512",
            "num_inference_steps": 200,
        }
    ).encode()
    address = httpx.URL(gateway)
    head = (
        f"POST {address.path}/images/generations HTTP/1.1\r\n"
        f"Host: {address.host}\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((address.host, address.port)) as connection:
        connection.sendall(head.encode() + body)
        running = poll(
            lambda: executing(cluster, dit) or None,
            timeout=PATIENCE,
            what="the denoise",
        )
    # the connection is closed: the gateway cancels the work
    poll(lambda: not executing(cluster, dit), PATIENCE, "the denoise to stop")
    (key,) = running
    assert stopped_early(cluster, request_id(key), 200)


# -- videos ----------------------------------------------------------------------------


def test_video_create_and_poll_then_download(gateway):
    client = api(gateway)
    video = client.videos.create_and_poll(
        model=VIDEO,
        prompt="waves on a beach",
        size="32x32",
        seconds="1",  # 16 fps: 17 frames
        extra_body={"num_inference_steps": 3, "seed": 4},
    )
    assert (video.status, video.progress, video.error) == ("completed", 100, None)
    assert video.completed_at >= video.created_at
    assert video.expires_at > video.completed_at
    with av.open(io.BytesIO(client.videos.download_content(video.id).read())) as mp4:
        stream = mp4.streams.video[0]
        assert (stream.width, stream.height) == (32, 32)
        assert sum(1 for _ in mp4.decode(stream)) == 17
    thumbnail = client.videos.download_content(video.id, variant="thumbnail").read()
    assert Image.open(io.BytesIO(thumbnail)).size == (32, 32)


def test_video_progress_goes_step_by_step(gateway):
    client = api(gateway)
    video = client.videos.create(
        model=VIDEO,
        prompt="a field of sunflowers",
        size="64x64",
        extra_body={"num_frames": 17, "num_inference_steps": 30},
    )
    seen = [(video.status, video.progress)]
    while seen[-1][0] in ("queued", "in_progress"):
        response = client.videos.with_raw_response.retrieve(video.id)
        current = response.parse()
        if current.status in ("queued", "in_progress"):
            assert int(response.headers["openai-poll-after-ms"]) == 100
        seen.append((current.status, current.progress))
        time.sleep(0.05)
    assert seen[-1] == ("completed", 100)
    progress = [p for _, p in seen]
    assert progress == sorted(progress)
    assert any(0 < p < 100 for p in progress), seen


def test_two_gateways_serve_one_job_and_a_restart_loses_none(
    cluster, gateway, keys_file, tmp_path
):
    small = {"size": "32x32", "extra_body": {"num_frames": 5, "num_inference_steps": 2}}
    with serving(cluster, keys_file, GATEWAY_ENV, tmp_path / "first") as first:
        created = [
            api(first).videos.create(model=VIDEO, prompt=prompt, **small)
            for prompt in ("a cat on a beach", "a dog on a beach")
        ]
        # the other gateway sees the jobs as they run
        assert api(gateway).videos.retrieve(created[0].id).id == created[0].id
    # the gateway that took the jobs is gone; a new one serves them
    with serving(cluster, keys_file, GATEWAY_ENV, tmp_path / "again") as restarted:
        client = api(restarted)
        for job in created:
            done = client.videos.poll(job.id)
            assert (done.status, done.progress) == ("completed", 100)
        content = client.videos.download_content(created[0].id).read()
        with av.open(io.BytesIO(content)) as mp4:
            assert sum(1 for _ in mp4.decode(video=0)) == 5
        # every job, in pages of one, newest first
        listed = [v.id for v in client.videos.list(limit=1)]
        assert listed[:2] == [created[1].id, created[0].id]
        assert len(listed) == len(set(listed))
        ascending = [v.id for v in client.videos.list(limit=100, order="asc")]
        assert ascending == listed[::-1]


def test_delete_mid_run_stops_the_dit_and_frees_the_job(cluster, gateway, strict):
    dit = WORKERS["dit", VIDEO]
    client = api(gateway)
    video = client.videos.create(model=VIDEO, prompt="a storm", extra_body=LONG_VIDEO)
    poll(
        lambda: client.videos.retrieve(video.id).status == "in_progress",
        PATIENCE,
        "denoising to start",
    )
    # tiny-wan admits one request at a time: a gateway that does not wait, 429s
    with http(strict) as other:
        refused = other.post(
            "/videos", json={"model": VIDEO, "prompt": "another", "num_frames": 5}
        )
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"

    (key,) = executing(cluster, dit)
    request = request_id(key)
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted) == (video.id, True)
    poll(lambda: not executing(cluster, dit), PATIENCE, "the DiT to stop")
    assert stopped_early(cluster, request, LONG_VIDEO["num_inference_steps"])
    poll(lambda: not job_keys(cluster, request, video.id), PATIENCE, "the job freed")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


# -- models, health, metrics -----------------------------------------------------------


def test_models_health_and_metrics(cluster, gateway):
    api(gateway).images.generate(model=IMAGE, prompt="a fox", extra_body={"seed": 1})
    models = {m.id: m for m in api(gateway).models.list()}
    assert set(models) == {IMAGE, VIDEO}
    pools = models[IMAGE].model_extra["pools"]
    assert sorted(pools) == sorted(STAGES)
    assert all(len(p["workers"]) == 1 for p in pools.values())
    assert models[VIDEO].model_extra["ready"] is True
    with http(gateway, key=None) as anyone:
        health = anyone.get("/health".join(gateway.rsplit("/v1", 1)))
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "models": [IMAGE, VIDEO]}
        text = anyone.get("/metrics".join(gateway.rsplit("/v1", 1))).text
    assert re.search(
        r'dflow_gateway_requests_total\{method="POST",route="/v1/images/generations",'
        r'status="200"\} [1-9]',
        text,
    ), text
    assert 'dflow_gateway_request_latency_seconds_bucket{le="0.005"' in text
    assert "dflow_gateway_requests_in_flight" in text


# -- errors ----------------------------------------------------------------------------

IMAGE_ERRORS = [
    ({"n": 0}, "n"),
    ({"n": 11}, "n"),
    ({"n": True}, "n"),
    ({"size": "large"}, "size"),
    ({"size": "60x64"}, "size"),
    ({"size": "64x4096"}, "size"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": "many"}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"response_format": "gif"}, "response_format"),
    ({"output_format": "bmp"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"negative_prompt": "blurry"}, "negative_prompt"),  # flux: guidance is embedded
    ({"prompt": " "}, "prompt"),
    ({"prompt": "a fox " * 40}, "prompt"),  # over the text encoder's tokens
    ({"prompt": None}, "prompt"),
    ({"quality": "hd"}, "quality"),
    ({"model": VIDEO}, "model"),
]
VIDEO_ERRORS = [
    ({"seconds": 1, "num_frames": 17}, "seconds"),
    ({"seconds": 0.3}, "seconds"),  # 6 frames
    ({"num_frames": 10}, "num_frames"),
    ({"size": "32"}, "size"),
    ({"input_reference": "https://example.com/cat.png"}, "input_reference"),
    ({"input_reference": {"file_id": "file-1"}}, "input_reference"),
    ({"input_reference": "data:image/png;base64,bm90IGFuIGltYWdl"}, "input_reference"),
    ({"model": IMAGE}, "model"),
]


@pytest.mark.parametrize(("change", "param"), IMAGE_ERRORS)
def test_each_bad_image_field_is_a_400_naming_it(gateway, change, param):
    body = {"model": IMAGE, "prompt": "a fox", **change}
    with http(gateway) as client:
        response = client.post("/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: "), error


@pytest.mark.parametrize(("change", "param"), VIDEO_ERRORS)
def test_each_bad_video_field_is_a_400_naming_it(gateway, change, param):
    body = {"model": VIDEO, "prompt": "waves", **change}
    with http(gateway) as client:
        response = client.post("/videos", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_uploaded_reference_image_is_refused_by_text_to_video(gateway):
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        api(gateway).videos.create(
            model=VIDEO,
            prompt="a red square",
            input_reference=("square.png", png.getvalue(), "image/png"),
        )
    assert caught.value.body["param"] == "input_reference"
    assert "takes no input image" in caught.value.body["message"]


def test_keys_are_required(gateway):
    body = {"model": IMAGE, "prompt": "a fox"}
    for key in (None, "sk-wrong", KEYS[0][:-1]):
        with http(gateway, key=key) as client:
            response = client.post("/images/generations", json=body)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert key is None or key not in response.text
    with pytest.raises(openai.AuthenticationError):
        api(gateway, key="sk-wrong").models.list()


def test_unknown_jobs_models_and_routes_are_404(gateway):
    with http(gateway) as client:
        for path in ("/videos/video_0", "/videos/video_0/content", "/models/nope"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert client.delete("/videos/video_0").status_code == 404
        response = client.post(
            "/images/generations", json={"model": "nope", "prompt": "a"}
        )
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "model"
        assert client.get("/nothing-here").status_code == 404


def test_an_oversized_body_is_a_413(gateway):
    body = {"model": IMAGE, "prompt": "x" * 300_000}
    with http(gateway) as client:
        response = client.post("/images/generations", json=body)
        assert response.status_code == 413
        # a chunked body (no Content-Length) is cut off as it grows
        chunks = (b"x" * 65536 for _ in range(8))
        response = client.post("/images/generations", content=chunks)
        assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_past_the_timeout_an_images_call_is_a_504(cluster, strict):
    body = {
        "model": IMAGE,
        "prompt": "a long exposure",
        "size": "512x512",
        "num_inference_steps": 200,
    }
    with http(strict) as client:
        response = client.post("/images/generations", json=body)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    dit = WORKERS["dit", IMAGE]
    poll(lambda: not executing(cluster, dit), PATIENCE, "the denoise to stop")


def test_a_model_without_workers_is_a_503_naming_its_stages(strict):
    with http(strict) as client:
        response = client.post(
            "/images/generations", json={"model": "tiny-pixart", "prompt": "a fox"}
        )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_not_served"
    assert "stage(s) encoder, dit, vae" in error["message"]


def test_dflow_progress_shows_each_step(cluster):
    requests = [
        dflow.Request(model=IMAGE, prompt="a quiet harbor", steps=4, seed=s)
        for s in range(2)
    ]
    out = io.StringIO()
    futures = dflow.map(cluster, requests)
    dflow.progress(futures, client=cluster, file=out)
    assert all(f.done() for f in futures)
    shown = out.getvalue()
    assert "8/8" in shown and "2/2 requests done" in shown, shown
