"""Per-weight optimizer state declared by a plugin and owned by the framework (momentum, Adam moments).

A plugin declares what it keeps per weight (:meth:`~zoedge.optim.base.ZOOptimizer.state_spec`: names, dtypes,
shapes); the framework creates each tensor zero at first use, keeps it on the host tier (host RAM; with the disk
tier, a file in the working directory, mapped), hands it to ``apply`` on the block's device, checkpoints and
resumes it, and ``plan`` counts it. The plugin writes no storage or checkpoint code.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StateSpec:
    """One state tensor kept per weight: its dtype and shape (None: the weight's shape)."""

    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] | None = None

    def nbytes(self, weight_shape: Iterable[int]) -> int:
        n = 1
        for d in self.shape if self.shape is not None else weight_shape:
            n *= int(d)
        return n * torch.empty((), dtype=self.dtype).element_size()


class OptimizerState:
    """The state tensors of a run, by (state name, weight name), on the host: in RAM, or mapped from files under
    ``directory`` (the disk tier); tensors of weights on the meta device (``plan``) stay on meta."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, key: str, name: str, spec: StateSpec, weight: torch.Tensor) -> torch.Tensor:
        """State ``key`` of weight ``name`` (created zero at first use)."""
        return self.reserve(key, name, spec, tuple(weight.shape), weight.device)

    def reserve(self, key: str, name: str, spec: StateSpec, weight_shape: tuple[int, ...], device: torch.device
                ) -> torch.Tensor:
        """State ``key`` of weight ``name`` (``weight_shape``, on ``device``), created zero now unless it exists
        (``zoedge memory`` creates it before the steps, outside the device's count)."""
        t = self.tensors.get((key, name))
        if t is None:
            t = self.tensors[key, name] = self._new(key, name, spec, weight_shape, device)
        return t

    def _new(self, key: str, name: str, spec: StateSpec, weight_shape: tuple[int, ...], device: torch.device
             ) -> torch.Tensor:
        shape = spec.shape if spec.shape is not None else weight_shape
        if device.type == "meta":
            return torch.zeros(shape, dtype=spec.dtype, device="meta")
        if self.directory is None:
            return torch.zeros(shape, dtype=spec.dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.{name}.bin"
        nbytes = spec.nbytes(weight_shape)
        with open(path, "wb") as f:  # a fresh file of zeros (a stale one from an earlier run is not read)
            f.truncate(nbytes)
        numel = nbytes // torch.empty((), dtype=spec.dtype).element_size()
        return torch.from_file(str(path), shared=True, size=numel, dtype=spec.dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{state name: {weight name: tensor}}`` (the tensors themselves: checkpoints copy them)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for (key, name), t in self.tensors.items():
            out.setdefault(key, {})[name] = t
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore the tensors of :meth:`state_dict` (into this run's storage: RAM or the directory's files)."""
        self.tensors = {}
        for key, by_name in state.items():
            for name, value in by_name.items():
                shape = tuple(value.shape)
                t = self.tensors[key, name] = self._new(key, name, StateSpec(value.dtype, shape), shape,
                                                        torch.device("cpu"))
                t.copy_(value)
