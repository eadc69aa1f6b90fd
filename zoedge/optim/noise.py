"""Counter-based noise: every draw is a pure function of (run seed, step, tensor name, stream).

``stream_seed(run_seed, step, name, stream)`` is the first 63 bits of
``sha256(f"zoedge/{run_seed}/{step}/{stream}/{name}")``; a draw re-seeds one
reusable ``torch.Generator`` with it and fills the target with ``normal_``.
Consequences:

* a tensor's noise does not depend on the order blocks are visited in, nor on
  what else was drawn before (each draw starts a fresh generator state);
* independent objects use distinct ``stream`` labels (``"z0"``, ``"z1"`` for
  directions, ``"U"`` / ``"V"`` for low-rank factors), so redrawing one never
  shifts another;
* values are reproducible per device type and dtype: CPU and CUDA generators
  produce different numbers for the same seed, and a bf16 target is filled
  directly in bf16 (not an fp32 draw rounded).
"""
from __future__ import annotations

import hashlib

import torch


def stream_seed(run_seed: int, step: int, name: str, stream: str) -> int:
    """The generator seed of one draw (see the module docstring)."""
    digest = hashlib.sha256(f"zoedge/{run_seed}/{step}/{stream}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class NoiseSource:
    """Draws standard-normal noise into caller-provided tensors, one generator per device.

    Args:
        run_seed: the run's seed.
    """

    def __init__(self, run_seed: int) -> None:
        self.run_seed = run_seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, name: str, stream: str) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device)
        return gen.manual_seed(stream_seed(self.run_seed, step, name, stream))

    def normal_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` in place with N(0, 1) noise for (step, name, stream); returns ``out``."""
        return out.normal_(generator=self._generator(out.device, step, name, stream))

    def uniform_(self, out: torch.Tensor, step: int, name: str, stream: str) -> torch.Tensor:
        """Fill ``out`` in place with U[0, 1) noise for (step, name, stream); returns ``out``."""
        return out.uniform_(generator=self._generator(out.device, step, name, stream))

    def normal(self, shape: tuple[int, ...], step: int, name: str, stream: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Allocate and fill (for small factors and tests)."""
        return self.normal_(torch.empty(shape, dtype=dtype, device=device), step, name, stream)
