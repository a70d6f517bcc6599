"""The FLOP count of a model config: per image for training and inference (`model_gflops`), per optimizer step of a
job (`train_flops_per_step`). Counted by torch's FlopCounterMode on the meta device, so no weights and no memory are
needed; it serves the MFU in each train record, `ltm reproduce --estimate` and the benchmarks.
"""

from __future__ import annotations

from dataclasses import replace

from ltm.config import Config

# (model config, image size) -> (training forward, inference) GFLOP per image: a count takes 0.5-3 CPU-s, and
# one process asks for the same model many times (an estimate over a table's runs, each Trainer a benchmark starts)
_COUNTED: dict[tuple[str, int], tuple[float, float]] = {}


def model_gflops(cfg: Config) -> tuple[float, float]:
    """(training forward, inference) GFLOP per image, counted by torch's FlopCounterMode on the meta device, once per
    model config and image size in a process (nothing else of `cfg` enters the count)."""
    key = (repr(cfg.model), cfg.data.image_size)
    if key not in _COUNTED:
        _COUNTED[key] = _count_gflops(cfg)
    return _COUNTED[key]


def _count_gflops(cfg: Config) -> tuple[float, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ltm.models import build_model
    from ltm.models.masking import GRADIENT_MAPS

    size = cfg.data.image_size
    # The gradient-based maps (GRADIENT_MAPS) take torch.autograd.grad inside the forward, which the counter's
    # module hooks cannot follow: the forward is counted with Eq. 2's map and that backward added as the teacher's
    # forward twice (a backward costs about two forwards).
    backward_map = cfg.model.kind == "ltm" and cfg.model.attention_map in GRADIENT_MAPS
    # The mask's schedules read values (the forward count of mask_warmup / mask_anneal, the boxes per image) that meta
    # tensors do not hold; they add no measurable FLOPs, so the forward is counted without them.
    counted = replace(cfg.model, mixup=False, mask_warmup=0, mask_anneal=0, erase_shape="cells",
                      **({"attention_map": "mean"} if backward_map else {}))
    with torch.device("meta"):
        # mixup draws lambda with .item(), which meta tensors cannot do; it adds no measurable FLOPs
        model = build_model(counted, size, load_weights=False)  # FLOPs need no weights
        images, labels = torch.empty(2, 3, size, size), torch.empty(2)
        with torch.no_grad(), FlopCounterMode(display=False) as train_fc:
            model(images, labels)
        train_flops = train_fc.get_total_flops()
        if backward_map:
            with torch.no_grad(), FlopCounterMode(display=False) as teacher_fc:
                model.teacher(images)
            train_flops += 2 * teacher_fc.get_total_flops()
        with FlopCounterMode(display=False) as predict_fc:
            model.predict(images)
    return train_flops / 2e9, predict_fc.get_total_flops() / 2e9


def train_flops_per_step(cfg: Config) -> float:
    """FLOPs of one optimizer step of the whole job: 3x the model's training forward (forward + backward) per image,
    counted by `model_gflops`, times the global batch."""
    return 3 * model_gflops(cfg)[0] * 1e9 * cfg.train.batch_size
