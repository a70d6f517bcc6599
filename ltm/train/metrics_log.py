"""What a training run records about itself: `metrics.jsonl` and TensorBoard (`MetricsLog`), and the throughput
figures in each train record (the FLOPs of a step, a device's peak TFLOP/s for MFU).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from ltm.config import Config

log = logging.getLogger(__name__)


class MetricsLog:
    """`<run>/metrics.jsonl` (one JSON object per line) and TensorBoard under `<run>/tb/`; rank 0 writes."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self._truncate(start_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after the checkpoint it resumes from
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def _truncate(self, step: int) -> None:
        """Keep the lines up to the resumed step: a run killed after its checkpoint logged steps it will redo."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:  # the last line of a run killed mid-write (node crash, full disk)
                log.warning("%s: dropping a line cut short by an earlier crash: %.80s", self.path, line)
                continue
            if record is not None and record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        kind, step = record.get("type"), record.get("step", 0)
        for key, value in record.items():
            scalar = isinstance(value, (int, float)) and math.isfinite(value)
            if scalar and key not in ("type", "step", "epoch", "time"):
                self.tb.add_scalar(f"{kind}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# Dense peak TFLOP/s of one device from its datasheet: (bf16/fp16, tf32 for fp32 training). MFU is achieved / peak.
PEAK_TFLOPS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
               "A10": (125.0, 62.5), "L4": (121.0, 60.0), "V100": (125.0, 15.7), "RTX 4090": (165.0, 82.6)}


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    """`train.peak_tflops`, else the table's entry for this GPU and precision; None on the CPU or an unknown GPU."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return half if cfg.train.precision in ("bf16", "fp16") else tf32
    log.info("no peak TFLOP/s known for %s: set train.peak_tflops to log MFU", name)
    return None
