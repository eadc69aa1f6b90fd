"""The names the layers and commands share, declared once and free of torch (the commands' ``--help`` stays fast)."""
from __future__ import annotations

#: dtypes of a prepared store (and of the compute)
STORE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: quantization of the decoder layers' matrices in a store
QUANT_KINDS: tuple[str, ...] = ("none", "int8", "nf4")
#: the GPUs ``plan`` knows by name (their figures: :data:`zoedge.hardware.GPUS`)
GPU_NAMES: tuple[str, ...] = ("rtx4090", "a100-80g", "h100", "h200")
