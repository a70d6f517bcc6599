"""An exported inference head (`ltm export`), loaded for scoring without the training stack.

    model = ExportedModel("student.onnx")          # onnxruntime; or a TorchScript `.pt` through torch.jit
    p_fake = model.predict(images)                  # (B, 3, S, S) RGB float in [0, 1] -> (B,) P(fake)
    model.meta["image_size"], model.meta["crop"]    # what `ltm predict` needs to cut faces as prep did

Imports nothing of DeepSpeed, DALI, timm or accelerate: `pip install 'ltm[predict]'` is enough.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

META_KEY = "ltm"  # ONNX metadata_props key / TorchScript extra file (`ltm.json`) holding the metadata
TORCHSCRIPT_META = "ltm.json"
FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


class ExportError(ValueError):
    """An exported model file that cannot be read or used; the message names the file."""


def format_of(path: str | os.PathLike) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ExportError(f"{path}: unknown model file type {Path(path).suffix!r} (expected one of "
                          f"{', '.join(FORMATS)}: ONNX or TorchScript as `ltm export` writes them)")
    return fmt


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata `ltm export` stored in the file (image size, crop recipe, head, run, version, ...)."""
    return ExportedModel(path, load=False).meta


class ExportedModel:
    """One exported head on the CPU (or CUDA, where onnxruntime's CUDA provider or torch's CUDA is present)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", load: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such file")
        self.format = format_of(self.path)
        self.device = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        self._session = self._module = None
        if self.format == "onnx":
            self.meta = self._onnx(load)
        else:
            self.meta = self._torchscript(load)
        for key in ("image_size", "crop", "head"):
            if key not in self.meta:
                raise ExportError(f"{self.path}: its ltm metadata has no {key!r} (not written by `ltm export`?)")

    def _onnx(self, load: bool) -> dict[str, Any]:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        # as many threads as torch uses (OMP_NUM_THREADS, a SLURM task's CPUs): onnxruntime would otherwise take
        # every core of the node, and array tasks sharing a node would fight over them
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid graphs
            raise ExportError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
        raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise ExportError(f"{self.path}: no '{META_KEY}' metadata (not written by `ltm export`)")
        self._session = session if load else None
        self._input = session.get_inputs()[0].name
        return json.loads(raw)

    def _torchscript(self, load: bool) -> dict[str, Any]:
        extra = {TORCHSCRIPT_META: ""}
        try:
            module = torch.jit.load(str(self.path), map_location=self.device, _extra_files=extra)
        except Exception as exc:  # torch.jit raises RuntimeError/ValueError variants for foreign files
            raise ExportError(f"{self.path}: not a loadable TorchScript model ({type(exc).__name__}: {exc})") from None
        if not extra[TORCHSCRIPT_META]:
            raise ExportError(f"{self.path}: no {TORCHSCRIPT_META} inside (not written by `ltm export`)")
        self._module = module.eval() if load else None
        return json.loads(extra[TORCHSCRIPT_META])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB float in [0, 1] -> (B,) P(fake), float32 on the CPU."""
        if self._session is not None:
            x = np.ascontiguousarray(images.detach().float().cpu().numpy())
            return torch.from_numpy(self._session.run(None, {self._input: x})[0]).float()
        if self._module is not None:
            return self._module(images.float().to(self.device)).float().cpu()
        raise ExportError(f"{self.path}: opened for its metadata only")
