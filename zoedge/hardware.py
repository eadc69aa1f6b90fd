"""Named GPUs with their datasheet figures, and the hardware a plan is made for.

Figures (datasheets; "effective" link rates are what pinned host-to-device
copies reach in practice, not the link's raw rate):

========== ========== =========================================== ======================================= ===========
name       memory     dense fp16/bf16 tensor TFLOP/s              host link                               memory BW
========== ========== =========================================== ======================================= ===========
rtx4090    24 GiB     165.2 (fp32 accumulate, what PyTorch uses)  PCIe 4.0 x16: 32 GB/s raw, ~25 effective 1008 GB/s
a100-80g   80 GiB     312                                         PCIe 4.0 x16: 32 GB/s raw, ~25 effective 2039 GB/s
h100       80 GiB     989 (SXM)                                   PCIe 5.0 x16: 64 GB/s raw, ~50 effective 3350 GB/s
h200       141 GB     989                                         PCIe 5.0 x16: 64 GB/s raw, ~52 effective 4800 GB/s
========== ========== =========================================== ======================================= ===========

The h200 link figure is zoedge's own measurement (streamed forward of six
Llama-2-7B-width fp16 layers, 2816 MiB per pass in 57.0 ms,
docs/measurements/h200-2026-11-29/); the others are the usual effective rates of
pinned copies (PCIe 4.0 ≈ 25 GB/s, 5.0 ≈ 50 GB/s). Disk: NVMe Gen4 ≈ 7 GB/s sequential read, ≈ 5 GB/s
write. Memory bandwidth (HBM/GDDR, datasheet) costs the step's elementwise noise, perturbation and update
work in the step-time prediction (:mod:`zoedge.plan.timing`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from zoedge.errors import ConfigError

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """What a plan is made for. Rates in bytes/s and FLOP/s; memory in bytes (None: not limited / unknown)."""

    name: str
    gpu_memory: int | None
    pcie: float
    gpu_flops: float
    disk: float = 7e9
    host_ram: int | None = None
    #: fraction of ``gpu_flops`` a forward reaches (calibrated: 0.51 for a resident 6-layer Llama-2-7B-width
    #: fp16 forward at 8x512 tokens on an H200, 24.0 ms; docs/measurements/h200-2026-11-29/)
    efficiency: float = 0.5
    #: bytes the CUDA allocator holds besides zoedge's tensors: torch's cuBLAS workspace (32 MiB on Hopper,
    #: 8 MiB + 128 KiB before; measured: 33-34 MiB above the counted buffers on an H200)
    cuda_extra: int = 4096 * 2 * 1024 + 16 * 8 * 1024
    #: disk write rate (bytes/s): write-backs of dense updates on the disk tier
    disk_write: float = 5e9
    #: device memory bandwidth (bytes/s, datasheet): the elementwise noise, perturbation and update work
    memory_bw: float = 1008e9

    @property
    def achieved_flops(self) -> float:
        """FLOP/s a forward reaches: ``gpu_flops × efficiency``."""
        return self.gpu_flops * self.efficiency

    def to_dict(self) -> dict:
        return asdict(self)


GPUS: dict[str, Hardware] = {
    "rtx4090": Hardware("rtx4090", 24 * GiB, 25e9, 165.2e12, memory_bw=1008e9),
    "a100-80g": Hardware("a100-80g", 80 * GiB, 25e9, 312e12, memory_bw=2039e9),
    "h100": Hardware("h100", 80 * GiB, 50e9, 989e12, cuda_extra=32 * 2**20, memory_bw=3350e9),
    "h200": Hardware("h200", 141 * 10**9, 52e9, 989e12, cuda_extra=32 * 2**20, memory_bw=4800e9),
}


def hardware(gpu: str | None = "rtx4090", *, gpu_memory_gb: float | None = None, pcie_gbps: float | None = None,
             gpu_tflops: float | None = None, disk_gbps: float | None = None, host_ram_gb: float | None = None,
             efficiency: float | None = None, disk_write_gbps: float | None = None,
             memory_gbps: float | None = None) -> Hardware:
    """A named GPU with any figure overridden (GB = 10^9 bytes for rates, GiB for memory sizes).

    Raises:
        ConfigError: unknown GPU name or a non-positive figure.
    """
    if gpu is not None and gpu not in GPUS:
        raise ConfigError("--gpu", f"unknown GPU {gpu!r}", f"use one of {', '.join(GPUS)} or give --gpu-memory, "
                          "--pcie-gbps and --gpu-tflops")
    base = GPUS[gpu] if gpu else Hardware("custom", None, 25e9, 165.2e12)
    for opt, v in (("--gpu-memory", gpu_memory_gb), ("--pcie-gbps", pcie_gbps), ("--gpu-tflops", gpu_tflops),
                   ("--disk-gbps", disk_gbps), ("--host-ram", host_ram_gb), ("--efficiency", efficiency),
                   ("--disk-write-gbps", disk_write_gbps), ("--gpu-mem-gbps", memory_gbps)):
        if v is not None and v <= 0:
            raise ConfigError(opt, f"{v}", "give a positive number")
    if efficiency is not None and efficiency > 1:
        raise ConfigError("--efficiency", f"{efficiency}", "give a fraction in (0, 1]")
    return Hardware(
        name=base.name if all(v is None for v in (gpu_memory_gb, pcie_gbps, gpu_tflops, memory_gbps))
        else f"{base.name} (custom)",
        gpu_memory=int(gpu_memory_gb * GiB) if gpu_memory_gb else base.gpu_memory,
        pcie=pcie_gbps * 1e9 if pcie_gbps else base.pcie,
        gpu_flops=gpu_tflops * 1e12 if gpu_tflops else base.gpu_flops,
        disk=disk_gbps * 1e9 if disk_gbps else base.disk,
        host_ram=int(host_ram_gb * GiB) if host_ram_gb else base.host_ram,
        efficiency=efficiency or base.efficiency, cuda_extra=base.cuda_extra,
        disk_write=disk_write_gbps * 1e9 if disk_write_gbps else base.disk_write,
        memory_bw=memory_gbps * 1e9 if memory_gbps else base.memory_bw)
