"""BatchNorm in fp32 inside a bf16/fp16 model: running statistics stored in fp32, normalisation computed in fp32.

DeepSpeed's bf16/fp16 modes cast every parameter to the half dtype, and ltm asks it (`data_types.buffer_dtype`)
to cast the buffers too, since PyTorch's batch_norm wants its weight, bias and running statistics in one dtype.
BatchNorm's running statistics have no fp32 master copy in the optimizer: they are updated in place,
`r <- (1 - m) r + m x_batch`, so in bf16 (8 significant bits) a step smaller than half the spacing of bf16 values
near r (2^-9 to 2^-8 of |r|) rounds away: with momentum m = 0.1, r never closes a gap to the batch statistics under
about 2-4% of its value.
Validation, `ltm eval` and export normalise with these statistics.

`keep_batchnorm_fp32` puts every BatchNorm layer's running statistics back in fp32 after DeepSpeed has cast the
module, and makes the layer read its weight and bias as fp32. The parameters themselves stay in the training dtype:
DeepSpeed's optimizers (ZeRO 1/2 and the bf16/fp16 wrappers) flatten each parameter group into one buffer of one
dtype and hold an fp32 master copy of every parameter, so a BatchNorm weight is updated in fp32 like any other
weight; only its bf16 copy is read in the forward, as every other layer's. With fp32 weight, bias and statistics,
PyTorch's batch_norm takes a bf16/fp16 input as it does under autocast ("mixed type", on the CPU and in cuDNN):
the statistics are accumulated and updated in fp32 and the output keeps the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_FP32_CLASSES: dict[type, type] = {}


def _fp32_parameter(name: str) -> property:
    def get(self: nn.Module) -> torch.Tensor | None:
        p = self._parameters[name]
        return p if p is None or p.dtype == torch.float32 else p.float()  # differentiable: the gradient reaches p

    return property(get, doc=f"the layer's {name} as fp32 (the parameter keeps its dtype)")


def _fp32_class(cls: type) -> type:
    """`cls` (BatchNorm2d, timm's BatchNormAct2d, SyncBatchNorm, ...) whose `weight` and `bias` read as fp32: the
    class's own forward then runs unchanged. A subclass, so isinstance checks (freeze_bn) still hold."""
    if cls not in _FP32_CLASSES:
        _FP32_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "weight": _fp32_parameter("weight"), "bias": _fp32_parameter("bias"), "_ltm_fp32_batchnorm": True,
        })
    return _FP32_CLASSES[cls]


def keep_batchnorm_fp32(module: nn.Module) -> int:
    """Every BatchNorm layer of `module`: running statistics cast to fp32 (in place, as DeepSpeed casts: the same
    tensor objects, so lists of the module's buffers stay valid), weight and bias read as fp32. Returns how many
    layers it changed; the state-dict keys do not change, so checkpoints load either way."""
    changed = 0
    for layer in module.modules():
        if not isinstance(layer, _BatchNorm):
            continue
        for name in ("running_mean", "running_var"):
            buffer = getattr(layer, name)
            if buffer is not None and buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()
        if not getattr(layer, "_ltm_fp32_batchnorm", False):
            layer.__class__ = _fp32_class(type(layer))
            changed += 1
    return changed
