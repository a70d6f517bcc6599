"""Headless Chromium driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON messages,
NUL-terminated, on the child's file descriptors 3 and 4), for tests that act on a page as a person would: open it,
drop a file on it (Input.dispatchDragEvent with the file, as a real drag from the desktop), read its state, take a
screenshot. No websocket library and no driver download: Debian's chromium (`browser.chromium()`) is enough."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

from browser import chromium


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    def __init__(self, width: int = 1280, height: int = 1000) -> None:
        self.width, self.height = width, height
        self._next = 0
        self._buffer = b""
        self.events: list[dict] = []

    def __enter__(self) -> Chromium:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends above 9, so that putting them on 3 and 4 cannot overwrite one with the other
        to_child_r, from_child_w = _above_9(to_child_r), _above_9(from_child_w)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--remote-debugging-pipe", f"--window-size={self.width},{self.height}", "about:blank"]
        # bash (dash takes one-digit fds only) puts the pipe ends where chromium wants them: commands on fd 3,
        # answers on fd 4
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w}', chromium(),
                                      *flags], pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                          "deviceScaleFactor": 1, "mobile": False}, session=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close", timeout_s=10)
        except Exception:  # already gone
            pass
        for fd in (self._to_child, self._from_child):
            os.close(fd)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # ---------------------------------------------------------------------------------------------- the protocol

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout_s: float = 60) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "chromium did not answer"
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                assert chunk, f"chromium closed the pipe (exit status {self.proc.poll()})"
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # ------------------------------------------------------------------------------------------------ the page

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait("document.readyState === 'complete'")

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.eval(f"Boolean({expression})"):
            assert time.monotonic() < deadline, f"page never reached: {expression}"
            time.sleep(0.1)

    def drop_file(self, selector: str, path: Path) -> None:
        """Drag `path` from outside the window onto the element's centre and drop it there."""
        box = json.loads(self.eval(f"JSON.stringify(document.querySelector({json.dumps(selector)})"
                                   ".getBoundingClientRect())"))
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        data = {"items": [], "files": [str(Path(path).resolve())], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            self.call("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data}, session=True)

    def screenshot(self, out: Path) -> Path:
        height = self.eval("document.documentElement.scrollHeight")
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": self.width,
                                                             "height": max(height, 100), "scale": 1}},
                         session=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        return out
