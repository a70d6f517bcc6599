"""Face detection and cropping: MTCNN (facenet-pytorch, batched) by default, OpenCV YuNet with a user model file.

Public API (also used by `ltm predict` to crop faces the way prep does):
    build_detector(name="mtcnn", device="auto", model_path=None, ...) -> Detector
        name: "mtcnn" | "yunet" (needs `model_path`, the ONNX file from OpenCV Zoo) | "none" (the whole frame is
        the face: for inputs that already are face crops).
    Detector.detect(frames) -> list of (k, 5) float arrays [x0, y0, x1, y1, score], one per frame
    Detector.crop(frames, size=224, scale=1.3) -> list[Face | None]
        the largest face of each frame, its box enlarged `scale` times (FF++ protocol), made square, shifted to lie
        inside the frame (shrunk to the frame's short side where it cannot), resized to `size` x `size`.
        None where a frame has no face.
    Face(crop: uint8 (size, size, 3), box: [x0, y0, x1, y1] as detected, crop_box: the square cut, score)
    square_box(box, scale, width, height) -> (x0, y0, x1, y1) ints
    cut_and_resize(image, crop_box, size) -> the crop's cut and resize, for any image or map of the frame's size
    Detector.info() -> dict for the manifest (name, versions, thresholds)

Detection runs on a copy scaled so that the short side is at most `detect_side` pixels (faces in FF++ / Celeb-DF are
large; MTCNN's image pyramid is the cost), boxes are mapped back to full resolution and the crop is cut from the
full-resolution frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Face:
    crop: np.ndarray
    box: list[float]
    crop_box: list[int]
    score: float


def square_box(box, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The FF++ crop: box enlarged `scale` times around its centre, square, kept inside the frame."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * scale
    side = int(round(min(side, width, height)))
    side = max(side, 1)
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def cut_and_resize(image: np.ndarray, crop_box, size: int) -> np.ndarray:
    """The crop as prep makes it: `image[y0:y1, x0:x1]` resized to `size` x `size` (area averaging when shrinking,
    bicubic when enlarging). Also cuts a fake's region map with the very same box and resize as its face crop."""
    x0, y0, x1, y1 = crop_box
    cut = np.ascontiguousarray(image[y0:y1, x0:x1])
    interp = cv2.INTER_AREA if cut.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(cut, (size, size), interpolation=interp)


def largest(boxes: np.ndarray) -> np.ndarray | None:
    if boxes is None or len(boxes) == 0:
        return None
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return boxes[int(np.argmax(areas))]


class Detector:
    name = "base"

    def __init__(self, detect_side: int = 320, min_face: int = 32, threshold: float = 0.9):
        self.detect_side = detect_side
        self.min_face = min_face
        self.threshold = threshold

    def _detect_scaled(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def detect(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Boxes (k, 5) [x0, y0, x1, y1, score] per frame, at the frames' own resolution."""
        if not frames:
            return []
        out: list[np.ndarray | None] = [None] * len(frames)
        # frames of one video share a size; group by size so MTCNN can batch them
        groups: dict[tuple[int, int], list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault(f.shape[:2], []).append(i)
        for (h, w), idxs in groups.items():
            f = min(1.0, self.detect_side / min(h, w)) if self.detect_side else 1.0
            small = [frames[i] if f == 1.0 else cv2.resize(frames[i], (round(w * f), round(h * f)),
                                                           interpolation=cv2.INTER_AREA) for i in idxs]
            for i, boxes in zip(idxs, self._detect_scaled(small)):
                boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
                boxes[:, :4] /= f
                out[i] = boxes
        return out  # type: ignore[return-value]

    def crop(self, frames: list[np.ndarray], size: int = 224, scale: float = 1.3) -> list[Face | None]:
        faces: list[Face | None] = []
        for frame, boxes in zip(frames, self.detect(frames)):
            box = largest(boxes)
            if box is None:
                faces.append(None)
                continue
            h, w = frame.shape[:2]
            x0, y0, x1, y1 = square_box(box, scale, w, h)
            crop = cut_and_resize(frame, (x0, y0, x1, y1), size)
            faces.append(Face(crop, [round(float(v), 1) for v in box[:4]], [x0, y0, x1, y1], float(box[4])))
        return faces

    def info(self) -> dict:
        return {"name": self.name, "detect_side": self.detect_side, "min_face": self.min_face,
                "threshold": self.threshold}


class MTCNNDetector(Detector):
    """facenet-pytorch's MTCNN (weights ship in its wheel); batches all frames of a size in one call."""

    name = "mtcnn"

    def __init__(self, device: str = "cpu", batch_size: int = 32, **kw):
        super().__init__(**kw)
        import torch
        from facenet_pytorch import MTCNN

        self.device = torch.device(device)
        self.batch_size = batch_size
        # P-Net and R-Net thresholds a step above facenet-pytorch's 0.6 / 0.7: fewer candidate boxes to crop and
        # re-score (the per-box resizing dominates MTCNN's CPU time) with the same faces found on FF++; the
        # final O-Net score is the configured threshold
        # and a pyramid step of 0.65 (facenet-pytorch: 0.709), one scale fewer over the usual face sizes
        self.model = MTCNN(keep_all=True, device=self.device, min_face_size=self.min_face,
                           thresholds=[0.7, 0.8, self.threshold], factor=0.65, post_process=False)

    def _detect_scaled(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray] = []
        with torch.inference_mode():
            for s in range(0, len(frames), self.batch_size):
                chunk = np.stack(frames[s:s + self.batch_size])
                boxes, probs = self.model.detect(chunk)
                for b, p in zip(boxes, probs):
                    if b is None:
                        out.append(np.zeros((0, 5), np.float32))
                    else:
                        out.append(np.concatenate([np.asarray(b, np.float32),
                                                   np.asarray(p, np.float32).reshape(-1, 1)], 1))
        return out

    def info(self) -> dict:
        import facenet_pytorch
        import torch

        return {**super().info(), "device": str(self.device), "batch_size": self.batch_size,
                "facenet_pytorch": getattr(facenet_pytorch, "__version__", _dist_version("facenet-pytorch")),
                "torch": torch.__version__}


class YuNetDetector(Detector):
    """OpenCV's YuNet (cv2.FaceDetectorYN) with the user's ONNX model file; about 5x faster than MTCNN on CPU."""

    name = "yunet"

    def __init__(self, model_path: str | Path, **kw):
        super().__init__(**kw)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"YuNet model file not found: {self.model_path} (pass --detector-model "
                                    "face_detection_yunet_2023mar.onnx from the OpenCV Zoo)")
        self.model = cv2.FaceDetectorYN.create(str(self.model_path), "", (320, 320), self.threshold, 0.3, 5000)
        self._size: tuple[int, int] | None = None

    def _detect_scaled(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for frame in frames:
            h, w = frame.shape[:2]
            if self._size != (w, h):
                self.model.setInputSize((w, h))
                self._size = (w, h)
            _, faces = self.model.detect(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            if faces is None or len(faces) == 0:
                out.append(np.zeros((0, 5), np.float32))
                continue
            x, y, fw, fh, score = faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 3], faces[:, 14]
            keep = np.minimum(fw, fh) >= self.min_face
            boxes = np.stack([x, y, x + fw, y + fh, score], 1)[keep]
            out.append(boxes.astype(np.float32))
        return out

    def info(self) -> dict:
        return {**super().info(), "model": self.model_path.name, "opencv": cv2.__version__}


class WholeFrame(Detector):
    """No detection: the frame is already a face crop (WildDeepfake); the square is its centre."""

    name = "none"

    def _detect_scaled(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        return [np.array([[0, 0, f.shape[1], f.shape[0], 1.0]], np.float32) for f in frames]

    def crop(self, frames: list[np.ndarray], size: int = 224, scale: float = 1.3) -> list[Face | None]:
        return super().crop(frames, size, 1.0)  # already cropped: no enlargement


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_detector(name: str = "mtcnn", device: str = "auto", model_path: str | Path | None = None,
                   detect_side: int = 320, min_face: int = 32, threshold: float = 0.9,
                   batch_size: int = 32) -> Detector:
    """A face detector by name: `mtcnn` (default), `yunet` (needs `model_path`) or `none`."""
    kw = {"detect_side": detect_side, "min_face": min_face, "threshold": threshold}
    if name == "mtcnn":
        return MTCNNDetector(device=resolve_device(device), batch_size=batch_size, **kw)
    if name == "yunet":
        if model_path is None:
            raise ValueError("--detector yunet needs --detector-model <yunet .onnx file>")
        return YuNetDetector(model_path, **kw)
    if name == "none":
        return WholeFrame(**kw)
    raise ValueError(f"unknown face detector {name!r} (choose mtcnn, yunet or none)")
