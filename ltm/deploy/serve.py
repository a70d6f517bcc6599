"""`ltm serve`: P(fake) over HTTP, with a page to drop a picture or a video on.

    ltm serve --run runs/x                      # a run's checkpoint (or --model student.onnx from `ltm export`)
    curl -F file=@face.jpg 'http://127.0.0.1:8080/v1/score?explain=1'

Endpoints: `POST /v1/score` (multipart field `file`, or the raw body), `GET /` (the page), `/healthz`, `/readyz`
(the model is loaded), `/metrics` (Prometheus text). A request goes the way of `ltm predict` (`ltm.deploy.predict`):
the same frame sampling, detector choice, crop, JPEG round trip and model call, so its scores are predict's. The
model call alone is shared: faces of concurrent requests go through one forward (`ltm.deploy.batcher`).

What an upload may ask of the server is bounded (`ltm.deploy.uploads`: bytes, pixels, video frames, types), and so
is the server's work: `--max-queue` requests at once (more get 503 with Retry-After), `--timeout` seconds each
(408 while the body is still arriving, 504 after). An upload is on disk only while it is decoded, in a folder of
the server's own (mode 0700, removed at exit), and removed before its answer leaves. One process holds one model;
replicas share nothing, so any load balancer can spread requests over them (docs/serve.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ltm.checkpoint import checked_run
from ltm.deploy.predict import (
    CropSettings,
    Detectors,
    Faces,
    ScoreSettings,
    crop_settings,
    find_faces,
    model_device,
    prediction,
    read_frames,
    score_faces,
)
from ltm.deploy.uploads import Limits, Media, UploadError, check_image, check_video, media_of, without_path

log = logging.getLogger(__name__)

ENDPOINTS = ("/", "/v1/score", "/healthz", "/readyz", "/metrics")
RETRY_AFTER_S = 1  # what a refused client is told to wait: a batch takes well under a second
LOADING_RETRY_AFTER_S = 5


# ------------------------------------------------------------------------------------------------------- the model


@dataclass
class Scorer:
    """One model with its detectors and settings: what every request of the process shares."""

    model: Any
    settings: ScoreSettings
    crop: CropSettings
    detectors: Detectors
    identity: dict
    max_batch: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def forward(self, images: torch.Tensor) -> list[float]:
        with self.autocast():
            return score_faces(self.model, images, self.max_batch)

    @property
    def explains(self) -> bool:
        return hasattr(self.model, "explain")

    def explain(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The teacher's attention map and mask of each crop (what `ltm predict --heatmap` draws)."""
        with torch.inference_mode(), self.autocast():
            out = self.model.explain(images.to(model_device(self.model)))
        return [(out["attention"][j].float().cpu(), out["mask"][j].float().cpu()) for j in range(len(images))]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_scorer(args: argparse.Namespace, stack: contextlib.ExitStack) -> Scorer:
    """The model of `--run` (its checkpoint, under the accelerator `ltm predict --run` scores with, entered on
    `stack`) or of `--model` (an exported head), its detectors built now rather than by the first request."""
    if args.model:
        from ltm.deploy.exported import ExportedModel

        model = ExportedModel(args.model, args.device)
        crop = CropSettings.from_metadata(model.meta, args.model)
        settings = ScoreSettings.from_metadata(model.meta)
        identity = {"run": model.meta.get("run_name"), "checkpoint": Path(str(model.meta.get("checkpoint"))).name,
                    "config_sha256": None, "file_sha256": _sha256(Path(args.model).read_bytes()),
                    "head": model.meta["head"], "format": model.format}
        digest, autocast, device = identity["file_sha256"], contextlib.nullcontext, str(model.device)
    else:
        from ltm.checkpoint.reader import load_model
        from ltm.config import to_yaml
        from ltm.eval.evaluate import scoring_accelerator

        model, cfg, source = load_model(args.run, args.tag, args.weights, args.overrides, "cpu")
        settings = ScoreSettings.from_config(cfg)
        accelerator = stack.enter_context(scoring_accelerator(cfg.train.precision, args.device,
                                                              cfg.eval.timeout_min))
        model = accelerator.prepare_model(model, evaluation_mode=True)
        crop = crop_settings(cfg)
        head = getattr(cfg.model, "inference_head", "student") if cfg.model.kind == "ltm" else cfg.model.kind
        identity = {"run": Path(args.run).resolve().name, "checkpoint": Path(source).name,
                    "config_sha256": _sha256(to_yaml(cfg).encode()), "head": head, "format": "pytorch"}
        digest, autocast, device = identity["config_sha256"], accelerator.autocast, str(accelerator.device)
    identity["id"] = f"{identity['run']}/{identity['checkpoint']}/{digest[:12]}"
    detectors = Detectors(crop, args.detector, device, args.detector_model)
    # Detectors builds on first use, unlocked: build every one a request can pick before the first request
    wanted = {args.detector} if args.detector else {"none", crop.detector if crop.detector != "none" else "mtcnn"}
    for name in sorted(wanted):
        detectors.get(name)
    return Scorer(model, settings, crop, detectors, identity, args.max_batch, autocast)


# ----------------------------------------------------------------------------------------------------- the metrics


class Metrics:
    """Prometheus metrics of one server (a registry of its own)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("ltm_serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ltm_serve_request_seconds", "POST /v1/score time from arrival to answer",
                                 buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.batch = Histogram("ltm_serve_batch_faces", "faces per model forward",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue = Gauge("ltm_serve_queue_depth", "scoring requests admitted and not yet answered",
                           registry=self.registry)
        self.faces_waiting = Gauge("ltm_serve_faces_waiting", "face crops waiting for a forward",
                                   registry=self.registry)
        self.ready = Gauge("ltm_serve_ready", "1 once the model is loaded", registry=self.registry)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------------------------------- the server


@dataclass
class ServeState:
    limits: Limits
    max_queue: int
    timeout_s: float
    decode_threads: int
    max_batch: int
    max_wait_s: float
    load: Callable[[contextlib.ExitStack], Scorer]  # in the background, once the server listens
    metrics: Metrics = field(default_factory=Metrics)
    scorer: Scorer | None = None
    load_error: str | None = None
    in_flight: int = 0
    on_fatal: Callable[[], None] = lambda: None
    tmp: Path | None = None
    batcher: Any = None
    decode_pool: ThreadPoolExecutor | None = None
    model_pool: ThreadPoolExecutor | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    plot_lock: threading.Lock = field(default_factory=threading.Lock)  # pyplot keeps global state


def _error(status: int, message: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def read_body(request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (413 beyond). A body a little over the limit is read to its end before
    the answer, so that the client, still sending, gets the 413 instead of a reset connection."""
    declared = request.headers.get("content-length")
    drain = 2 * limit + (1 << 20)
    message = f"request body: more than {limit} bytes (--max-bytes {limit})"
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise UploadError(400, f"Content-Length {declared!r} is not a number") from None
        if length > limit:
            if length > drain:
                raise UploadError(413, message.replace("more than", f"{length} bytes,", 1))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks = []
            if size > drain:
                break
            continue
        chunks.append(chunk)
    if size > limit:
        raise UploadError(413, message)
    return b"".join(chunks)


async def upload_of(request, limits: Limits) -> tuple[bytes, str | None, str, str]:
    """(bytes, declared type, the file's name for messages, the field named in messages) of a request: the
    multipart field `file`, else the raw body."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_body(request, limits.max_bytes)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        if content_type.lower().startswith("application/x-www-form-urlencoded"):
            content_type = ""  # curl --data-binary's default: says nothing about the bytes
        return body, content_type, request.query_params.get("name", "upload"), "request body"

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=16)
    try:
        form = await parser.parse()
    except (MultiPartException, KeyError, ValueError) as exc:  # KeyError: a Content-Type without its boundary
        raise UploadError(400, f"multipart form: unreadable ({type(exc).__name__}: {exc})") from None
    try:
        part = form.get("file")
        if part is None:
            fields = ", ".join(sorted(form.keys())) or "none"
            raise UploadError(400, f"multipart form: no field `file` (its fields: {fields})")
        if not isinstance(part, UploadFile):
            raise UploadError(400, "multipart field `file`: a text field, not a file part")
        data = await part.read()
        name = Path(part.filename or "upload").name[:200] or "upload"
        return data, part.content_type, name, "field `file`"
    finally:
        await form.close()  # spooled parts live in anonymous temporary files: closed, they are gone


def prepare(state: ServeState, media: Media, path: Path, name: str) -> tuple[Faces, dict]:
    """Check the limits on the media's header, decode as `ltm predict` does and find the faces (a decode thread);
    the upload's file is removed here, whatever happens."""
    from data_prep.video import VideoError

    scorer, limits = state.scorer, state.limits
    try:
        info: dict[str, Any] = {}
        if media.kind == "image":
            check_image(path, name, limits)
        else:
            info["video_frames"], info["fps"] = check_video(path, name, limits)
        try:
            frames = read_frames(path, limits.frames if media.kind == "video" else None)
        except VideoError as exc:
            raise UploadError(400, f"{name}: {without_path(str(exc), path)}") from None
        if not frames:
            raise UploadError(400, f"{name}: no frame could be decoded")
        info["height"], info["width"] = frames[0][1].shape[:2]
        return find_faces(frames, scorer.detectors, scorer.crop, scorer.settings.image_size), info
    finally:
        path.unlink(missing_ok=True)


def overlays(state: ServeState, faces: Faces, maps: list, probs: list[float], name: str) -> list[str]:
    """The attention picture of each face (`plot_attention`, as `ltm predict --heatmap` draws it) as a PNG data URL."""
    from ltm.eval.report.files import plot_attention

    out = []
    for i, (attention, mask) in enumerate(maps):
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=state.tmp)
        os.close(fd)
        try:
            with state.plot_lock:
                plot_attention(tmp, faces.images[i], attention, mask,
                               f"{name} frame {faces.kept[i]}: P(fake) = {probs[i]:.3f}")
            out.append("data:image/png;base64," + base64.b64encode(Path(tmp).read_bytes()).decode())
        finally:
            Path(tmp).unlink(missing_ok=True)
    return out


async def score_request(request, state: ServeState, ticket, stage: dict) -> dict:
    loop = asyncio.get_running_loop()
    data, declared, name, field_name = await upload_of(request, state.limits)
    stage["name"] = "decode"
    media = media_of(data, declared, field_name)
    fd, tmp = tempfile.mkstemp(suffix=media.suffix, dir=state.tmp)
    path = Path(tmp)
    stage["path"] = path
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    del data
    faces, info = await loop.run_in_executor(state.decode_pool, prepare, state, media, path, name)
    scorer = state.scorer
    settings = scorer.settings
    stage["name"] = "score"
    answer: dict[str, Any] = {
        "file": name, "kind": media.kind, "format": media.format, "p_fake": None, "verdict": None,
        "threshold": settings.threshold, "video_agg": settings.video_agg, "faces": [],
        "frames_sampled": faces.n_frames, "no_face": faces.no_face, "detector": faces.detector, **info,
        "model": scorer.identity,
    }
    if not faces.kept:
        ticket.close()
        answer["reason"] = (f"no face found in any of its {faces.n_frames} sampled frame"
                            f"{'s' if faces.n_frames != 1 else ''} (detector {faces.detector})")
        return answer
    probs = await state.batcher.score(faces.images, ticket)
    result = prediction(name, faces, probs, settings.video_agg)
    answer.update(p_fake=result.p_fake, verdict="fake" if result.p_fake >= settings.threshold else "real",
                  faces=result.frames)
    if request.query_params.get("explain", "0").lower() in ("1", "true", "yes"):
        stage["name"] = "explain"
        if scorer.explains:
            maps = await loop.run_in_executor(state.model_pool, scorer.explain, faces.images)
            pictures = await loop.run_in_executor(state.decode_pool, overlays, state, faces, maps, probs, name)
            for frame, picture in zip(answer["faces"], pictures):
                frame["overlay"] = picture
        else:
            answer["explain_note"] = f"a {scorer.identity['format']} {scorer.identity['head']} head has no attention"
    return answer


async def score_endpoint(request):
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse

    state: ServeState = request.app.state.serve
    started = time.perf_counter()
    if state.scorer is None:
        return _error(503, f"not ready: {state.load_error or 'the model is loading'}",
                      {"Retry-After": str(LOADING_RETRY_AFTER_S)})
    if state.in_flight >= state.max_queue:
        return _error(503, f"busy: {state.in_flight} requests in progress (--max-queue {state.max_queue}); retry "
                           f"after {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
    timeout = state.timeout_s
    asked = request.query_params.get("timeout")
    if asked is not None:
        try:
            timeout = min(timeout, float(asked))
        except ValueError:
            return _error(400, f"query parameter `timeout`: {asked!r} is not a number of seconds")
        if not timeout > 0:
            return _error(400, f"query parameter `timeout`: {asked!r} must be above 0")
    state.in_flight += 1
    state.metrics.queue.set(state.in_flight)
    ticket = state.batcher.ticket()
    stage: dict[str, Any] = {"name": "upload"}
    try:
        answer = await asyncio.wait_for(score_request(request, state, ticket, stage), timeout)
    except asyncio.TimeoutError:
        status = 408 if stage["name"] == "upload" else 504
        what = "the request body did not arrive" if status == 408 else f"not answered ({stage['name']} stage)"
        return _error(status, f"{what} within the request timeout of {timeout:g} s (--timeout)")
    except UploadError as exc:
        return _error(exc.status, str(exc))
    except ClientDisconnect:
        return _error(400, "the client went away before its upload arrived")
    except Exception as exc:  # the server outlives whatever one request does to it
        log.exception("request failed in its %s stage", stage["name"])
        return _error(500, f"internal error in the {stage['name']} stage: {type(exc).__name__}: {exc}")
    finally:
        ticket.close()
        if "path" in stage:
            stage["path"].unlink(missing_ok=True)  # after a timeout the decoder may still hold it: gone anyway
        state.in_flight -= 1
        state.metrics.queue.set(state.in_flight)
        state.metrics.faces_waiting.set(state.batcher.faces_waiting)
    answer["ms"] = round((time.perf_counter() - started) * 1000, 1)
    request.state.log = (f"{answer['kind']} faces={len(answer['faces'])} "
                         f"p_fake={'-' if answer['p_fake'] is None else format(answer['p_fake'], '.4f')}")
    return JSONResponse(answer)


class Observe:
    """Each HTTP request: one log line (client, method, path, status, time, what was scored) and its metrics."""

    def __init__(self, app, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - started
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            metrics = self.state.metrics
            metrics.requests.labels(endpoint, str(status[0])).inc()
            if endpoint == "/v1/score":
                metrics.latency.observe(seconds)
            client = scope.get("client") or ("-", 0)
            query = scope.get("query_string", b"").decode("latin-1")
            extra = scope.get("state", {}).get("log", "")
            log.info("%s %s %s%s %d %.1f ms %s", client[0], scope.get("method", "-"), path,
                     f"?{query}" if query else "", status[0], seconds * 1000, extra)


def create_app(state: ServeState):
    """The Starlette application of one server (its lifespan loads the model in the background)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from ltm.deploy.batcher import Batcher

    page = (Path(__file__).with_name("serve.html")).read_text()

    async def index(request):
        return HTMLResponse(page)

    async def healthz(request):
        return JSONResponse({"ok": True})

    async def readyz(request):
        if state.scorer is None:
            return JSONResponse({"ready": False, "reason": state.load_error or "the model is loading"},
                                status_code=503, headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})
        return JSONResponse({"ready": True, "model": state.scorer.identity})

    async def metrics(request):
        state.metrics.faces_waiting.set(state.batcher.faces_waiting)
        body, content_type = state.metrics.text()
        return Response(body, media_type=content_type)

    async def load_model() -> None:
        loop = asyncio.get_running_loop()
        try:
            state.scorer = await loop.run_in_executor(state.model_pool, state.load, state.stack)
        except Exception as exc:
            state.load_error = f"loading the model failed: {type(exc).__name__}: {exc}"
            log.error("%s", state.load_error)
            state.on_fatal()
            return
        state.metrics.ready.set(1)
        log.info("ready: model %s (%s head, %s), crops %d px x%.2f (from %s), batches of up to %d faces",
                 state.scorer.identity["id"], state.scorer.identity["head"], state.scorer.identity["format"],
                 state.scorer.crop.size, state.scorer.crop.scale, state.scorer.crop.source, state.scorer.max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        from PIL import Image

        # PIL refuses pictures over its own bomb limit before ours is checked: keep its limit above ours
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 2 * state.limits.max_pixels)
        state.tmp = Path(tempfile.mkdtemp(prefix="ltm-serve-"))
        state.decode_pool = ThreadPoolExecutor(state.decode_threads, thread_name_prefix="ltm-decode")
        state.model_pool = ThreadPoolExecutor(1, thread_name_prefix="ltm-model")  # one model call at a time
        state.batcher = Batcher(lambda images: state.scorer.forward(images), state.model_pool,
                                state.max_batch, state.max_wait_s, state.metrics.batch.observe)
        state.batcher.start()
        loader = asyncio.get_running_loop().create_task(load_model())
        try:
            yield
        finally:
            loader.cancel()
            await state.batcher.stop()
            state.decode_pool.shutdown(wait=True, cancel_futures=True)
            state.model_pool.shutdown(wait=True, cancel_futures=True)
            state.stack.close()
            shutil.rmtree(state.tmp, ignore_errors=True)
            log.info("stopped")

    app = Starlette(routes=[Route("/", index), Route("/healthz", healthz), Route("/readyz", readyz),
                            Route("/metrics", metrics), Route("/v1/score", score_endpoint, methods=["POST"])],
                    lifespan=lifespan)
    app.state.serve = state
    return Observe(app, state)


# ---------------------------------------------------------------------------------------------------- the command


def _size(text: str) -> int:
    """`50MB`, `2GiB`, `1e6` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    if unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r}: a size is a number with an optional unit (B, KB, MB, GB, MiB)")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a size") from None


def _count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--model", help="an exported head (`ltm export`: .onnx or TorchScript .pt) instead of --run")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--weights", default=None, help="a consolidated fp32 state-dict file instead of a tag")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one, logged at start)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--detector", choices=["mtcnn", "yunet", "none"], default=None,
                        help="face detector for every upload (default: as `ltm predict` picks it per file)")
    parser.add_argument("--detector-model", default=None, help="YuNet ONNX file for --detector yunet")
    parser.add_argument("--frames", type=_count, default=Limits.frames,
                        help=f"frames sampled per video, evenly spaced ({Limits.frames}, as ltm predict)")
    parser.add_argument("--max-batch", type=_count, default=32, help="most faces in one forward (32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="longest a face waits for other requests' faces to fill a batch (10 ms); a lone "
                             "request does not wait")
    parser.add_argument("--decode-threads", type=_count, default=2,
                        help="threads that decode uploads and find faces (2)")
    parser.add_argument("--torch-threads", type=_count, default=None,
                        help="torch's threads per operation (default: this process's CPUs / --decode-threads): "
                             "requests in parallel use the cores better than one operation over all of them")
    parser.add_argument("--max-queue", type=_count, default=128,
                        help="requests in progress at once; more are answered 503 with Retry-After (128)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a request may take, upload included (60; `?timeout=S` asks for less)")
    parser.add_argument("--max-bytes", type=_size, default=Limits.max_bytes,
                        help="largest request body (50MB; 413 beyond)")
    parser.add_argument("--max-pixels", type=_count, default=Limits.max_pixels,
                        help="largest picture or video frame in pixels (40e6; 413 beyond)")
    parser.add_argument("--max-video-frames", type=_count, default=Limits.max_video_frames,
                        help="longest video in frames, by its header (18000: 10 minutes at 30 fps; 413 beyond)")
    parser.add_argument("overrides", nargs="*", default=[], help="config key=value overrides (with --run)")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that `--port 0` can say which port it got before serving."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; the requests in flight then are answered before the process exits."""
    import uvicorn

    if (args.run is None) == (args.model is None):
        raise ValueError("give --run RUN_FOLDER (a training run) or --model FILE (an `ltm export` file), one of them")
    if args.model and (args.overrides or args.tag or args.weights):
        raise ValueError("--tag, --weights and config overrides go with --run; an exported model carries its weights "
                         "and settings")
    if args.run:  # the run folder, its config and checkpoint, checked before the port opens
        checked_run(args.run, args.overrides, args.tag, args.weights)
    if args.model and not Path(args.model).is_file():
        raise ValueError(f"--model {args.model}: no such file")
    if not (args.timeout > 0 and args.max_wait_ms >= 0):
        raise ValueError("--timeout must be above 0 and --max-wait-ms at least 0")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.torch_threads or max(1, cpus // args.decode_threads))
    limits = Limits(args.max_bytes, args.max_pixels, args.max_video_frames, args.frames)
    state = ServeState(limits, args.max_queue, args.timeout, args.decode_threads, args.max_batch,
                       args.max_wait_ms / 1000, functools.partial(load_scorer, args))
    app = create_app(state)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(args.timeout) + 5)
    server = uvicorn.Server(config)
    failed = []

    def fatal() -> None:
        failed.append(True)
        server.should_exit = True

    state.on_fatal = fatal
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d (loading the model; GET /readyz says when it is loaded)", shown, port)
    # uvicorn re-raises the signal that stopped it once it is done: with a handler of ours that is a no-op, so the
    # process ends with status 0 after a graceful shutdown instead of dying of the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 1 if failed else 0
