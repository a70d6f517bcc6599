"""Validation during training: frame AUC and log loss of the inference head over `data.val`, every rank scoring its
share (the engine calls it every `train.val_every` steps and keeps the best checkpoint by its AUC).
"""

from __future__ import annotations

import numpy as np
import torch

from ltm.config import Config
from ltm.distributed import DistEnv, all_gather_object


class Validator:
    """Frame AUC (sklearn) and loss of the inference head over cfg.data.val, every rank scoring its share."""

    def __init__(self, cfg: Config, env: DistEnv):
        from ltm.data import build_eval_loader

        self.cfg, self.env = cfg, env
        self.loader = None
        if cfg.data.val:
            self.loader = build_eval_loader(cfg, cfg.data.val, env.rank, env.world_size, env.device,
                                            cfg.eval.batch_size)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, dtype: torch.dtype) -> dict:
        from sklearn.metrics import log_loss, roc_auc_score

        scores, labels = [], []
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):  # whatever the loader draws stays out of the training stream
            for i, batch in enumerate(self.loader):
                if self.cfg.train.val_batches and i >= self.cfg.train.val_batches:
                    break
                scores.append(model.predict(batch["images"].to(dtype)).float().cpu())
                labels.append(batch["labels"].float().cpu())
        model.train(was_training)
        mine = (torch.cat(scores).numpy() if scores else np.zeros(0), torch.cat(labels).numpy() if labels
                else np.zeros(0))
        parts = all_gather_object(mine)  # the only collective of a validation: every rank gets every score
        s = np.concatenate([p[0] for p in parts]).astype(np.float64)
        y = np.concatenate([p[1] for p in parts])
        both = len(np.unique(y)) == 2
        return {
            "val_auc": float(roc_auc_score(y, s)) if both else float("nan"),
            "val_loss": float(log_loss(y, np.clip(s, 1e-7, 1 - 1e-7), labels=[0, 1])) if len(y) else float("nan"),
            "val_frames": int(len(y)),
        }
