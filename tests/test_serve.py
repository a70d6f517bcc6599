"""`ltm serve` as a real server process on the loopback: real uploads of real faces, MTCNN, the tiny run's model.

One server for the module (its start-up is the cost), small limits so that each refusal is cheap to provoke, and a
long `--max-wait-ms`: requests that are in the server together then share forwards for certain, since a batch
leaves only when it is full or when no other admitted request can still add faces. Concurrency is made exact with
uploads held open: a request whose body is half sent is admitted and waits, for as long as the test likes. The
last test stops the server with SIGTERM while such a request is in flight.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from shared_data import SHARED_DATA

# `make test` gives a module to one worker (--dist loadfile): one server for the module, stopped after its last test

REPO = Path(__file__).resolve().parents[1]
PHOTO_A = SHARED_DATA / "faces" / "3ddfa__examples_inputs_JianzhuGuo.jpg"
PHOTO_B = SHARED_DATA / "faces" / "deepface__tests_unit_dataset_img12.jpg"
VIDEO = SHARED_DATA / "videos" / "retalking__examples_face_3.mp4"  # 125 frames
LONG_VIDEO = SHARED_DATA / "videos" / "liveportrait__assets_examples_driving_d11.mp4"  # 225 frames
FFPP_FAKE = SHARED_DATA / "ffpp-sample" / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "519_515.mp4"

FRAMES = 4
MAX_BYTES = 2_000_000
MAX_PIXELS = 3_000_000
MAX_VIDEO_FRAMES = 200
MAX_QUEUE = 4
MAX_BATCH = 3


@dataclass
class Server:
    url: str
    host: str
    port: int
    proc: subprocess.Popen
    log: Path
    tmp: Path  # the server's TMPDIR: where an upload could be left behind

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=60)

    def score(self, path: Path | None = None, data: bytes | None = None, name: str | None = None,
              content_type: str = "application/octet-stream", query: str = "") -> requests.Response:
        data = path.read_bytes() if data is None else data
        files = {"file": (name or (path.name if path else "upload"), data, content_type)}
        return requests.post(f"{self.url}/v1/score{query}", files=files, timeout=120)

    def metric(self, name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", self.get("/metrics").text, re.M)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))

    def uploads_left(self) -> list[str]:
        """Files under the server's TMPDIR: its own folder (ltm-serve-*) must be empty between requests."""
        return sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*") if p.is_file())


def multipart(path: Path, field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class HeldUpload:
    """A POST /v1/score whose body is sent but for its last bytes: admitted by the server, waiting on us."""

    def __init__(self, server: Server, path: Path, query: str = "") -> None:
        self.body, content_type = multipart(path)
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        self.conn.putrequest("POST", f"/v1/score{query}")
        self.conn.putheader("Content-Type", content_type)
        self.conn.putheader("Content-Length", str(len(self.body)))
        self.conn.endheaders()
        self.conn.send(self.body[:-16])

    def release(self) -> None:
        self.conn.send(self.body[-16:])

    def finish(self) -> tuple[int, dict]:
        self.release()
        return self.answer()

    def answer(self) -> tuple[int, dict]:
        response = self.conn.getresponse()
        out = response.status, json.loads(response.read())
        self.conn.close()
        return out


def wait_for(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll until `condition()` holds (a deadline against hanging, not a speed check)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ffpp_frame(tmp_path_factory) -> Path:
    """A real FaceForensics++ frame (Deepfakes, c23), as a PNG."""
    from data_prep.video import sample_frames

    ((_, frame),) = sample_frames(FFPP_FAKE, 1)
    path = tmp_path_factory.mktemp("ffpp") / "519_515_deepfakes.png"
    Image.fromarray(frame).save(path)
    return path


@contextmanager
def running_server(args: list[str], tmp: Path):
    """`ltm serve ARGS --port 0` in its own process, TMPDIR under `tmp`, until the model is loaded; stopped after."""
    (tmp / "tmpdir").mkdir()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "ltm.cli", "serve", *args, "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp / "tmpdir"), "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def listening():
            assert proc.poll() is None, log.read_text()[-3000:]
            return re.search(r"listening on http://([\d.]+):(\d+)", log.read_text())

        wait_for(listening, "the server to listen")
        host, port = listening().groups()
        srv = Server(f"http://{host}:{port}", host, int(port), proc, log, tmp / "tmpdir")

        def ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            return requests.get(srv.url + "/readyz", timeout=10).status_code == 200

        wait_for(ready, "the model to load")
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    args = ["--run", str(tiny_run), "--weights", str(tiny_run / "weights.pt"), "--frames", str(FRAMES),
            "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS), "--max-video-frames", str(MAX_VIDEO_FRAMES),
            "--max-queue", str(MAX_QUEUE), "--max-batch", str(MAX_BATCH), "--max-wait-ms", "20000", "--timeout", "60"]
    with running_server(args, tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(tiny_run, ffpp_frame) -> dict[str, dict]:
    """`ltm predict --json` of every file the tests score with the same run: file name -> its result."""
    from ltm.cli import main

    out = io.StringIO()
    files = [PHOTO_A, PHOTO_B, VIDEO, ffpp_frame]
    with redirect_stdout(out):
        code = main(["predict", *map(str, files), "--run", str(tiny_run), "--weights", str(tiny_run / "weights.pt"),
                     "--frames", str(FRAMES), "--json"])
    assert code == 0
    results = {Path(r["file"]).name: r for r in map(json.loads, out.getvalue().strip().splitlines())}
    scores = {name: [f["p_fake"] for f in r["frames"]] for name, r in results.items()}
    # faces of different files score apart: a request answered with another one's scores could not pass
    gaps = [abs(a - b) for x in scores for y in scores if x < y for a in scores[x] for b in scores[y]]
    assert min(gaps) > 1e-4, scores
    return results


def assert_same_as_predict(answer: dict, expected: dict) -> None:
    assert answer["p_fake"] == pytest.approx(expected["p_fake"], abs=1e-5)
    assert [f["frame"] for f in answer["faces"]] == [f["frame"] for f in expected["frames"]]
    assert [f["p_fake"] for f in answer["faces"]] == pytest.approx([f["p_fake"] for f in expected["frames"]],
                                                                   abs=1e-5)
    assert [f["box"] for f in answer["faces"]] == [f["box"] for f in expected["frames"]]


# ------------------------------------------------------------------------------------------------------- scoring


def test_scores_equal_ltm_predict(server, expected, ffpp_frame):
    """A picture (multipart), a video (raw body) and a FaceForensics++ frame: predict's scores, the video's
    aggregate as eval.video_agg makes it, the model's id; the probes and metrics answer."""
    answer = server.score(PHOTO_A).json()
    assert_same_as_predict(answer, expected[PHOTO_A.name])
    assert answer["kind"] == "image" and answer["verdict"] in ("fake", "real") and answer["detector"] == "mtcnn"
    model = answer["model"]
    assert model["checkpoint"] == "weights.pt" and len(model["config_sha256"]) == 64 and model["head"] == "student"
    response = requests.post(f"{server.url}/v1/score?name={VIDEO.name}", data=VIDEO.read_bytes(),
                             headers={"Content-Type": "video/mp4"}, timeout=120)
    assert response.status_code == 200, response.text
    video = response.json()
    assert video["kind"] == "video" and video["frames_sampled"] == FRAMES and video["video_agg"] == "mean"
    assert_same_as_predict(video, expected[VIDEO.name])
    assert video["p_fake"] == pytest.approx(np.mean([f["p_fake"] for f in video["faces"]]), abs=1e-9)
    assert_same_as_predict(server.score(ffpp_frame).json(), expected[ffpp_frame.name])
    assert server.get("/healthz").json() == {"ok": True}
    assert server.get("/readyz").json()["model"] == model
    metrics = server.get("/metrics").text
    assert 'ltm_serve_requests_total{endpoint="/v1/score",status="200"} 3.0' in metrics
    assert "ltm_serve_request_seconds_count 3.0" in metrics and "ltm_serve_queue_depth 0.0" in metrics
    assert server.uploads_left() == []


def test_explain_adds_an_attention_overlay_per_face(server, expected):
    answer = server.score(PHOTO_B, query="?explain=1").json()
    assert_same_as_predict(answer, expected[PHOTO_B.name])
    (face,) = answer["faces"]
    assert face["overlay"].startswith("data:image/png;base64,")
    import base64

    with Image.open(io.BytesIO(base64.b64decode(face["overlay"].split(",", 1)[1]))) as picture:
        assert picture.format == "PNG" and picture.width > 200
    assert server.uploads_left() == []


def test_concurrent_requests_share_forwards_and_get_their_own_scores(server, expected, ffpp_frame):
    """Four requests in the server together (7 faces, batches of at most 3): three forwards carry them, so faces of
    different requests share one; each request gets exactly its own faces' scores."""
    count, total = server.metric("ltm_serve_batch_faces_count"), server.metric("ltm_serve_batch_faces_sum")
    files = [PHOTO_A, VIDEO, PHOTO_B, ffpp_frame]
    held = [HeldUpload(server, path) for path in files]
    wait_for(lambda: server.metric("ltm_serve_queue_depth") == len(files), "the requests to be admitted")
    for h in held:  # all bodies complete before any answer is read
        h.release()
    answers = [h.answer() for h in held]
    for path, (status, answer) in zip(files, answers):
        assert status == 200, answer
        assert_same_as_predict(answer, expected[path.name])
    assert server.metric("ltm_serve_batch_faces_sum") - total == 1 + FRAMES + 1 + 1
    assert server.metric("ltm_serve_batch_faces_count") - count == 3  # 3 + 3 + 1 faces
    assert server.uploads_left() == []


def test_a_full_queue_answers_503_with_retry_after(server, expected):
    held = [HeldUpload(server, PHOTO_A) for _ in range(MAX_QUEUE)]
    wait_for(lambda: server.metric("ltm_serve_queue_depth") == MAX_QUEUE, "the queue to fill")
    refused = server.score(PHOTO_B)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert f"--max-queue {MAX_QUEUE}" in refused.json()["error"]
    for h in held:
        h.release()
    for h in held:
        status, answer = h.answer()
        assert status == 200
        assert_same_as_predict(answer, expected[PHOTO_A.name])
    assert_same_as_predict(server.score(PHOTO_B).json(), expected[PHOTO_B.name])


# ------------------------------------------------------------------------------------------------ untrusted input


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_inputs() -> list[tuple[str, dict, int, str]]:
    jpeg = PHOTO_A.read_bytes()
    mp4 = VIDEO.read_bytes()
    bomb = png(2000, 2000)  # 4 MP of one grey: 13 KB of PNG
    assert len(bomb) < 100_000
    return [
        ("too many bytes", {"data": b"\xff\xd8\xff" + bytes(MAX_BYTES)}, 413, f"--max-bytes {MAX_BYTES}"),
        ("too many pixels", {"data": bomb, "name": "bomb.png"}, 413,
         f"2000x2000 = 4000000 pixels is over the limit of {MAX_PIXELS} (--max-pixels)"),
        ("too long a video", {"path": LONG_VIDEO}, 413, f"225 frames is over the limit of {MAX_VIDEO_FRAMES}"),
        ("declared text", {"data": b"hello", "content_type": "text/plain"}, 415, "declared type 'text/plain'"),
        ("not media", {"data": b"%PDF-1.7 not a picture", "name": "paper.jpg"}, 415, "no image or video format"),
        ("truncated picture", {"data": jpeg[:len(jpeg) // 2], "name": "half.jpg"}, 400,
         "half.jpg: unreadable image"),
        ("corrupt video", {"data": mp4[:32] + bytes(4096), "name": "broken.mp4"}, 400, "broken.mp4:"),
        ("empty upload", {"data": b""}, 400, "empty upload"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_input_is_refused_with_its_reason_and_the_server_goes_on(server, expected, case):
    _, kwargs, status, message = case
    response = server.score(**kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.json()
    assert_same_as_predict(server.score(PHOTO_B).json(), expected[PHOTO_B.name])  # the next request is served
    assert server.uploads_left() == []


def test_requests_without_a_file_or_a_face(server):
    body, content_type = multipart(PHOTO_A, field="picture")
    response = requests.post(f"{server.url}/v1/score", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 400 and "no field `file` (its fields: picture)" in response.json()["error"]
    blank = server.score(data=png(320, 240), name="wall.png").json()
    assert blank["faces"] == [] and blank["p_fake"] is None and blank["verdict"] is None
    assert blank["reason"] == "no face found in any of its 1 sampled frame (detector mtcnn)"
    wrong = requests.get(f"{server.url}/v1/score", timeout=10)
    assert wrong.status_code == 405


def test_a_request_past_its_timeout_is_answered_and_leaves_nothing(server, expected):
    held = HeldUpload(server, PHOTO_A, query="?timeout=0.5")
    status, answer = held.answer()  # the body never completes
    assert status == 408 and "did not arrive within the request timeout of 0.5 s" in answer["error"]
    assert_same_as_predict(server.score(PHOTO_B).json(), expected[PHOTO_B.name])
    assert server.uploads_left() == []


def test_one_log_line_per_request(server):
    marker = uuid.uuid4().hex
    server.get(f"/healthz?{marker}")
    wait_for(lambda: marker in server.log.read_text(), "the request's log line")  # written after the answer
    lines = [line for line in server.log.read_text().splitlines() if marker in line]
    assert len(lines) == 1 and f"GET /healthz?{marker} 200" in lines[0]
    scored = [line for line in server.log.read_text().splitlines() if "POST /v1/score" in line]
    assert scored and all(re.search(r" \d{3} [\d.]+ ms", line) for line in scored)


def test_an_exported_model_scores_as_ltm_predict_model(tiny_run, tmp_path, capsys):
    """`ltm serve --model` with an `ltm export` TorchScript file: `ltm predict --model`'s scores; no teacher, so
    `?explain=1` says so instead of drawing."""
    from ltm.cli import main
    from ltm.deploy.export import export

    model = tmp_path / "student.pt"
    export(tiny_run, model, "torchscript", weights=tiny_run / "weights.pt")
    capsys.readouterr()
    assert main(["predict", str(PHOTO_B), "--model", str(model), "--json"]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (tmp_path / "serve").mkdir()
    with running_server(["--model", str(model)], tmp_path / "serve") as exported:
        answer = exported.score(PHOTO_B, query="?explain=1").json()
    assert_same_as_predict(answer, want)
    assert answer["model"]["format"] == "torchscript" and answer["model"]["head"] == "student"
    assert len(answer["model"]["file_sha256"]) == 64 and "overlay" not in answer["faces"][0]
    assert answer["explain_note"] == "a torchscript student head has no attention"


# --------------------------------------------------------------------------------------------------------- the page


def test_page_in_chromium_shows_the_verdict_and_the_overlay(server, expected, ffpp_frame, tmp_path):
    """Drop a FaceForensics++ frame on the page in headless Chromium (a real drag and drop through the DevTools
    protocol): the verdict, the face boxed, the attention overlay; the screenshot is kept beside the test's files."""
    from cdp import Chromium

    with Chromium() as browser:
        browser.open(server.url + "/")
        browser.wait("document.body.dataset.state === 'idle' && document.getElementById('model').textContent"
                     ".includes('student head')")
        browser.drop_file("#drop", ffpp_frame)
        browser.wait("['done', 'error'].includes(document.body.dataset.state)")
        state = browser.eval("""JSON.stringify({
            state: document.body.dataset.state, error: document.getElementById('error').textContent,
            verdict: document.getElementById('verdict').textContent,
            canvas: [document.getElementById('picture').width, document.getElementById('picture').height],
            overlays: [...document.querySelectorAll('#faces img')].map(i => i.complete && i.naturalWidth),
            labels: [...document.querySelectorAll('#faces .label')].map(l => l.textContent)})""")
        shot = browser.screenshot(tmp_path / "serve-page.png")
    state = json.loads(state)
    want = expected[ffpp_frame.name]
    assert state["state"] == "done" and state["error"] == "", state
    verdict = "FAKE" if want["p_fake"] >= 0.5 else "REAL"
    assert state["verdict"] == f"{verdict}: P(fake) = {want['p_fake']:.3f}"
    assert state["canvas"][0] > 100 and state["canvas"][1] > 100  # the frame drawn, with its box
    assert len(state["overlays"]) == 1 and state["overlays"][0] > 200  # the attention picture decoded
    assert state["labels"] == [f"frame 0: P(fake) {want['frames'][0]['p_fake']:.3f}"]
    with Image.open(shot) as picture:
        assert picture.width >= 1000
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 20  # not a blank page
    print(f"screenshot: {shot}")


# ----------------------------------------------------------------------------------------------- last: shutdown


def test_shutdown_answers_the_request_in_flight(server, expected):
    """SIGTERM while a request is in flight: the server stops listening, answers that request, exits 0, and leaves
    no upload and no folder of its own behind. (Stops the module's server: the last test.)"""
    held = HeldUpload(server, PHOTO_A)
    wait_for(lambda: server.metric("ltm_serve_queue_depth") == 1, "the request to be admitted")
    server.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            requests.get(server.url + "/healthz", timeout=5)
        except requests.ConnectionError:
            return True
        return False

    wait_for(refused, "the server to stop listening")
    status, answer = held.finish()
    assert status == 200
    assert_same_as_predict(answer, expected[PHOTO_A.name])
    assert server.proc.wait(timeout=120) == 0
    assert "stopped" in server.log.read_text()
    assert list(server.tmp.iterdir()) == []


def test_a_bad_run_is_refused_before_the_port_opens(tiny_run, tmp_path, caplog):
    """The run folder, its config and the checkpoint asked for are checked before the server listens: one error line
    that names what is missing, exit status 2, and no port taken."""
    from ltm.cli import main

    def refusal(*args: str) -> str:
        caplog.clear()
        assert main(["serve", *args, "--port", "0"]) == 2
        return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")

    assert refusal("--run", str(tmp_path / "nope")) == f"run folder '{tmp_path / 'nope'}': no such folder"
    not_a_run = f"{tmp_path / 'config.yaml'}: no such file (not a run folder written by `ltm train`)"
    assert refusal("--run", str(tmp_path)) == not_a_run
    assert refusal("--run", str(tiny_run), "--weights", str(tmp_path / "w.pt")) == \
        f"weights file '{tmp_path / 'w.pt'}': no such file"
    assert "no finished checkpoint" in refusal("--run", str(tiny_run))
    weights = str(tiny_run / "weights.pt")
    assert "key 'model.nope'" in refusal("--run", str(tiny_run), "--weights", weights, "model.nope=1")
