"""`ltm serve` under load: a real server process on the loopback against `ltm predict`'s path on the same pictures.

1. `ltm predict`'s throughput: the same run, the same real face photos, scored one file after another by
   `predict_file` (what `ltm predict FILES --run R` does per file, its start-up left out), in this process; once
   with torch's own number of threads (as `ltm predict` runs) and once with the server's threads per operation.
2. The server (`ltm serve --port 0`, a process of its own): `--clients` concurrent clients, each sending
   `--requests` multipart uploads of the pictures in turn (keep-alive connections). Every answer must be a 200
   whose P(fake) equals part 1's for that picture (1e-5): none lost. Throughput (requests/s, start of the first
   to end of the last), client-side p50/p99 latency, and the batch-size histogram read from the server's /metrics.
3. Pictures per CPU-second of each (the server process's CPU time, all its threads; predict's in this process).

Parts 1 and 2 alternate for `--rounds` rounds (the server idles while predict runs), since a shared machine's load
moves between minutes. The headline ratio is the median over the rounds of the server's pictures/s over `ltm
predict`'s (target >= 0.8); beside it, against predict at the server's threads per operation (what the server's
own work costs or gains: HTTP, uploads, hand-offs, requests side by side, shared forwards), and per CPU-second.

    python bench/serve.py                                  # tiny-cpu, 16 photos, 3 rounds of 64 clients x 2
    python bench/serve.py --run runs/x --clients 64 --requests 8 --pictures 48

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ltm.config import load_config, save_config  # noqa: E402
from ltm.models import build_model  # noqa: E402

SHARED = Path(os.environ.get("LTM_SHARED_DATA", ROOT.parent / "shared" / "data"))
TARGET = 0.8


def pictures(n: int) -> list[Path]:
    """`n` real photos showing one face each (SOURCES.tsv: photo, one face found), smallest names first."""
    sources = SHARED / "SOURCES.tsv"
    if not sources.is_file():
        raise SystemExit(f"no {sources} (set LTM_SHARED_DATA to the shared media folder)")
    rows = [line.split("\t") for line in sources.read_text().splitlines()[1:]]
    found = sorted(SHARED / r[0] for r in rows if len(r) > 6 and r[1] == "photo" and r[6] == "1")
    if len(found) < n:
        raise SystemExit(f"only {len(found)} one-face photos in {SHARED / 'faces'}, asked for {n}")
    return found[:n]


def tiny_run(work: Path) -> tuple[Path, Path]:
    cfg = load_config("tiny-cpu", [f"data.root={work / 'none'}"])
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size).state_dict(), run / "weights.pt")
    return run, run / "weights.pt"


class PredictPath:
    """`ltm predict --run`'s per-file path, set up once (model under its scoring accelerator, detectors)."""

    def __init__(self, run: Path, weights: Path | None, stack: contextlib.ExitStack) -> None:
        from ltm.checkpoint.reader import load_model
        from ltm.deploy.predict import Detectors, ScoreSettings, crop_settings
        from ltm.eval.evaluate import scoring_accelerator

        model, cfg, _ = load_model(run, None, weights, [], "cpu")
        self.settings = ScoreSettings.from_config(cfg)
        self.accelerator = stack.enter_context(scoring_accelerator(cfg.train.precision, "auto", cfg.eval.timeout_min))
        self.model = self.accelerator.prepare_model(model, evaluation_mode=True)
        self.crop = crop_settings(cfg)
        self.detectors = Detectors(self.crop, None, str(self.accelerator.device))

    def score(self, files: list[Path], threads: int | None = None) -> tuple[float, float, dict[str, float]]:
        """(pictures/s, pictures per CPU-second) of `predict_file` over `files`, and each file's P(fake); with
        torch's own number of threads, or `threads`."""
        from ltm.deploy.predict import predict_file

        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            with self.accelerator.autocast():
                start, cpu = time.perf_counter(), time.process_time()
                scores = {str(f): predict_file(f, self.model, self.settings, self.detectors, self.crop).p_fake
                          for f in files}
                seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        finally:
            torch.set_num_threads(before)
        return len(files) / seconds, len(files) / cpu_s, scores


def start_server(run: Path, weights: Path | None, work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ltm.cli", "serve", "--run", str(run), "--port", "0",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--decode-threads", str(args.decode_threads), "--max-queue", str(max(128, args.clients))]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    log = work / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        found = re.search(r"listening on (http://\S+)", log.read_text())
        if found:
            url = found.group(1)
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    return proc, url
            except requests.ConnectionError:
                pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server was not ready within 300 s: {log.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_histogram(url: str) -> dict[str, int]:
    """Forwards per batch size bucket (`le` bound -> forwards with at most that many faces and more than the bucket
    below), from the server's cumulative Prometheus histogram."""
    text = requests.get(url + "/metrics", timeout=30).text
    cumulative = [(le, float(v)) for le, v in re.findall(r'^ltm_serve_batch_faces_bucket\{le="([^"]+)"\} (\S+)$',
                                                          text, re.M)]
    out, below = {}, 0.0
    for le, count in cumulative:
        if count > below:
            out[le.replace(".0", "")] = int(count - below)
        below = count
    return out


def load(url: str, files: list[Path], clients: int, per_client: int, expected: dict[str, float]) -> dict:
    bodies = {str(f): f.read_bytes() for f in files}
    latencies: list[float] = []
    lost: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        session = requests.Session()
        barrier.wait()
        for r in range(per_client):
            path = str(files[(c * per_client + r) % len(files)])
            started = time.perf_counter()
            try:
                response = session.post(url + "/v1/score", files={"file": (Path(path).name, bodies[path])},
                                        timeout=300)
                answer = response.json()
                want = expected.get(path)
                ok = response.status_code == 200 and (want is None or abs(answer["p_fake"] - want) <= 1e-5)
                why = f"{response.status_code} {answer.get('error') or answer.get('p_fake')}"
            except Exception as exc:  # a lost request, whatever the cause
                ok, why = False, f"{type(exc).__name__}: {exc}"
            with lock:
                latencies.append(time.perf_counter() - started)
                if not ok:
                    lost.append(f"{Path(path).name}: {why}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"requests": len(latencies), "lost": lost, "seconds": seconds, "requests_per_s": len(latencies) / seconds,
            "latencies": latencies}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder (default: tiny-cpu with its ImageNet weights, made here)")
    parser.add_argument("--weights", help="a consolidated weights file for --run")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client and round (2)")
    parser.add_argument("--pictures", type=int, default=16, help="distinct real face photos (16)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None, help="the server's (default: its own)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved predict / serve rounds (3)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = pictures(args.pictures)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    server_threads = args.torch_threads or max(1, cpus // args.decode_threads)  # as `ltm serve` sets them
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        run, weights = (Path(args.run), Path(args.weights) if args.weights else None) if args.run else tiny_run(work)
        predict = PredictPath(run, weights, stack)
        predict.score(files[:2])  # warm-up: the detector's and the model's first calls
        proc, url = start_server(run, weights, work, args)
        try:
            load(url, files[:2], 2, 1, {})  # warm-up, in the server
            before = batch_histogram(url)
            # interleaved rounds: a shared machine's load moves between minutes, and moves all three alike
            for r in range(args.rounds):
                rate, per_cpu, expected = predict.score(files)  # the server idles meanwhile
                same_rate, same_cpu, _ = predict.score(files, server_threads)
                cpu = cpu_seconds(proc.pid)
                served = load(url, files, args.clients, args.requests, expected)
                served["per_cpu_s"] = served["requests"] / (cpu_seconds(proc.pid) - cpu)
                rounds.append({"predict": rate, "predict_per_cpu_s": per_cpu, "predict_same_threads": same_rate,
                               "predict_same_threads_per_cpu_s": same_cpu, "serve": served})
                print(f"round {r + 1}: pictures/s: predict {rate:.2f}, predict at {server_threads} thread(s) "
                      f"{same_rate:.2f}, serve {served['requests_per_s']:.2f}; per CPU-second: {per_cpu:.2f}, "
                      f"{same_cpu:.2f}, {served['per_cpu_s']:.2f}; {len(served['lost'])} lost", flush=True)
            after = batch_histogram(url)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    latencies = [x for r in rounds for x in r["serve"]["latencies"]]
    lost = [x for r in rounds for x in r["serve"]["lost"]]
    histogram = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}

    def median_ratio(serve_key: str, predict_key: str) -> float:
        return statistics.median(r["serve"][serve_key] / r[predict_key] for r in rounds)

    figures = {
        "ratio": median_ratio("requests_per_s", "predict"),
        "ratio_same_threads": median_ratio("requests_per_s", "predict_same_threads"),
        "cpu_ratio": median_ratio("per_cpu_s", "predict_per_cpu_s"),
        "cpu_ratio_same_threads": median_ratio("per_cpu_s", "predict_same_threads_per_cpu_s"),
        "requests": len(latencies), "lost": len(lost),
        "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
        "batch_histogram": histogram,
    }
    verdict = "met" if figures["ratio"] >= TARGET else "not met"
    print(f"ltm serve: {args.rounds} rounds of {args.clients} clients x {args.requests} requests over {len(files)} "
          f"pictures: {figures['requests']} answered, {figures['lost']} lost; latency p50 {figures['p50_ms']:.0f} ms, "
          f"p99 {figures['p99_ms']:.0f} ms")
    print(f"forwards by batch size (faces <= bound): {histogram}")
    print(f"serve / predict at {server_threads} thread(s) per operation, as the server: "
          f"{figures['ratio_same_threads']:.2f}x pictures/s, {figures['cpu_ratio_same_threads']:.2f}x per CPU-second")
    print(f"serve / ltm predict (torch's {torch.get_num_threads()} threads), medians of the rounds: "
          f"{figures['ratio']:.2f}x pictures/s (target >= {TARGET}: {verdict}), {figures['cpu_ratio']:.2f}x per "
          "CPU-second")
    for example in lost[:5]:
        print(f"lost: {example}")
    for r in rounds:
        r["serve"] = {k: v for k, v in r["serve"].items() if k not in ("latencies", "lost")}
    print(json.dumps({**figures, "rounds": rounds, "clients": args.clients, "requests_per_client": args.requests,
                      "pictures": len(files), "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                      "server_torch_threads": server_threads, "target": TARGET}))

if __name__ == "__main__":
    main()
