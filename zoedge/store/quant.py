"""Quantized storage of large weight matrices (int8 / nf4 via bitsandbytes).

With ``--quant int8`` or ``--quant nf4`` the block store keeps the big 2-D
matrices of the decoder layers compressed. Only the compressed bytes cross
PCIe; the device expands them just in time, one matrix or one chunk of rows at a time, at the op that reads
them (:mod:`zoedge.runtime.dequantized`, :func:`dequantize_rows`).

A quantized tensor is stored as a few named *parts*, each a plain 1-D tensor:

* ``int8`` (bitsandbytes dynamic 8-bit, blockwise):
  ``data`` uint8 ``(numel,)``, ``absmax`` float32 ``(nblocks,)``,
  ``code`` float32 ``(256,)`` (the dynamic code table, stored so a store stays
  readable if bitsandbytes ever changes its default map).
* ``nf4`` (bitsandbytes NormalFloat4, blockwise, no double quantization):
  ``data`` uint8 ``(numel // 2,)`` (two 4-bit codes a byte, high nibble first),
  ``absmax`` float32 ``(nblocks,)``. The 16-entry NF4 table is built into the
  kernels, so it is not stored.

``nblocks = ceil(numel / blocksize)``; blocks run over the *flattened* tensor
(they may straddle rows). :func:`part_specs` gives this layout from
``(kind, shape, blocksize)`` alone, so a reader can lay out slots before any
data is read.

Allocation (bitsandbytes 0.50): ``out=`` kernels (``dequantize_blockwise.out``,
``dequantize_4bit.out``) exist for CUDA (and XPU; MPS for 4-bit only). There
:func:`dequantize_into` writes straight into ``out``; nothing full-size is
allocated. On CPU bitsandbytes has no ``out=`` kernels (the ``.out`` ops raise
NotImplementedError), so the CPU path lets the kernel allocate one full-size
tensor of ``out.dtype`` and copies it into ``out``. CPU is the test path only.

CPU nf4 caveat (bitsandbytes 0.50.2): its CPU nf4 kernel takes a 2-D shape
``(m, n)`` and gives wrong values when ``n % blocksize != 0`` (blocks that
straddle rows). We always pass the flat shape ``(numel,)``, for which it is
exact; an odd ``numel`` would send it to a slow torch.compile'd fallback,
hence nf4 requires an even ``numel``.
"""
from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING, Literal

import torch

from zoedge.errors import ConfigError
from zoedge.names import QUANT_KINDS  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType

QuantKind = Literal["none", "int8", "nf4"]

# Block sizes (values per absmax scale). Smaller blocks track local outliers
# better but cost 32 bits of absmax per block. Measured on SmolLM2-135M layer
# matrices (relative Frobenius error) and per-parameter storage:
#   int8: bs 64 0.97% (+0.50 bit), 256 1.1% (+0.125 bit), 4096 1.4-1.55% (+0.008 bit)
#   nf4:  bs 64 9.3%  (+0.50 bit), 128 9.7% (+0.25 bit)
# int8 uses 256 (bitsandbytes' own default is 4096, i.e. a whole row of a
# 4096-wide model shares one scale; 256 keeps outliers local for +1.6% bytes).
# nf4 uses 64, the QLoRA / bitsandbytes default (4.5 bits a parameter without
# double quantization, which we avoid to keep absmax plain fp32).
DEFAULT_BLOCKSIZE: dict[str, int] = {"int8": 256, "nf4": 64}

# Block sizes the CUDA kernels accept (the CPU kernels accept these too).
VALID_BLOCKSIZES: dict[str, tuple[int, ...]] = {
    "int8": (64, 128, 256, 512, 1024, 2048, 4096),
    "nf4": (32, 64, 128, 256, 512, 1024, 2048, 4096),
}

OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
MIN_DIM = 16  # matrices with a smaller side are not worth quantizing

PartSpecs = dict[str, tuple[torch.dtype, tuple[int, ...]]]

# torch dispatch keys by device type, to ask whether bitsandbytes has an out= kernel.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}


@cache
def _bnb() -> ModuleType:
    """Import ``bitsandbytes.functional`` lazily (slow, and it logs a harmless 'kernels' warning)."""
    import bitsandbytes.functional as bnbf

    return bnbf


def import_backend() -> None:
    """Import bitsandbytes now (it is otherwise imported at the first quantized op)."""
    _bnb()


def check_kind(kind: str) -> None:
    """Raise if ``kind`` is not a quantization kind.

    Raises:
        ConfigError: naming ``--quant``, the bad value and the allowed values.
    """
    if kind not in QUANT_KINDS:
        raise ConfigError("--quant", f"unknown value {kind!r}", f"use one of {', '.join(QUANT_KINDS)}")


def check_blocksize(kind: str, blocksize: int) -> None:
    """Raise if bitsandbytes cannot (de)quantize ``kind`` with ``blocksize`` on every device.

    Raises:
        ConfigError: for ``--quant int8``/``nf4`` with an unsupported block size.
    """
    check_kind(kind)
    if kind != "none" and blocksize not in VALID_BLOCKSIZES[kind]:
        raise ConfigError(f"block size of --quant {kind}", f"{blocksize!r} is not supported by bitsandbytes",
                          f"use one of {', '.join(map(str, VALID_BLOCKSIZES[kind]))} "
                          f"(default {DEFAULT_BLOCKSIZE[kind]})")


def should_quantize(name: str, shape: tuple[int, ...], kind: str, dtype: torch.dtype | None = None) -> bool:
    """Whether a decoder-layer tensor is stored quantized under ``kind``.

    Only 2-D ``*weight`` matrices with both sides >= 16 qualify (nf4 also needs
    an even element count); norms, biases and other 1-D tensors never do. The
    caller passes only decoder-layer tensors.

    Args:
        name: tensor name, e.g. ``"layers.3.self_attn.q_proj.weight"``.
        shape: its shape.
        kind: ``none`` | ``int8`` | ``nf4``.
        dtype: its dtype if known; non-floating tensors are never quantized.

    Returns:
        True if the tensor should be stored as ``kind`` parts.

    Raises:
        ConfigError: for an unknown ``kind``.
    """
    check_kind(kind)
    if kind == "none" or len(shape) != 2 or min(shape) < MIN_DIM:
        return False
    if dtype is not None and not dtype.is_floating_point:
        return False
    leaf = name.rsplit(".", 1)[-1]
    if leaf != "weight" or "norm" in name.lower():
        return False
    return not (kind == "nf4" and math.prod(shape) % 2)


def _numel(shape: tuple[int, ...] | torch.Size) -> int:
    return int(math.prod(shape))


def part_specs(kind: str, shape: tuple[int, ...], blocksize: int,
               dtype: torch.dtype | None = None) -> PartSpecs:
    """Layout of the stored parts of one tensor, from its kind, shape and block size alone.

    Args:
        kind: ``none`` | ``int8`` | ``nf4``.
        shape: the original tensor's shape.
        blocksize: values per absmax block (ignored for ``none``).
        dtype: the stored dtype; needed only for ``none`` (one part ``data`` of that dtype).

    Returns:
        ``{part name: (dtype, 1-D shape)}`` in storage order, e.g. for int8
        ``{"data": (uint8, (numel,)), "absmax": (float32, (nblocks,)), "code": (float32, (256,))}``.

    Raises:
        ConfigError: unknown kind or unsupported block size.
        ValueError: ``none`` without ``dtype``; nf4 with an odd element count.
    """
    check_blocksize(kind, blocksize)
    n = _numel(shape)
    if kind == "none":
        if dtype is None:
            raise ValueError("part_specs('none', ...) needs the stored dtype: pass dtype=")
        return {"data": (dtype, (n,))}
    nblocks = -(-n // blocksize)
    if kind == "int8":
        return {"data": (torch.uint8, (n,)), "absmax": (torch.float32, (nblocks,)),
                "code": (torch.float32, (256,))}
    if n % 2:
        raise ValueError(f"nf4 needs an even number of elements, shape {tuple(shape)} has {n}; "
                         "store this tensor unquantized (should_quantize() says so)")
    return {"data": (torch.uint8, (n // 2,)), "absmax": (torch.float32, (nblocks,))}


def quantize(t: torch.Tensor, kind: str, blocksize: int) -> dict[str, torch.Tensor]:
    """Quantize ``t`` into its stored parts.

    Args:
        t: any floating tensor (any device); it is quantized from fp32 on the CPU.
        kind: ``none`` | ``int8`` | ``nf4``.
        blocksize: values per absmax block.

    Returns:
        Contiguous CPU tensors exactly matching :func:`part_specs` (dtype and shape).
        For ``none``: ``{"data": t flattened}`` in ``t``'s dtype.

    Raises:
        ConfigError: unknown kind or unsupported block size.
        ValueError: non-floating ``t``; nf4 with an odd element count.
    """
    specs = part_specs(kind, tuple(t.shape), blocksize, dtype=t.dtype)
    if not t.is_floating_point():
        raise ValueError(f"can only quantize floating tensors, got {t.dtype}")
    if kind == "none":
        return {"data": t.detach().to("cpu").contiguous().reshape(-1).clone()}
    flat = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)  # (numel,)
    F = _bnb()
    if kind == "int8":
        data, state = F.quantize_blockwise(flat, blocksize=blocksize)
        parts = {"data": data, "absmax": state.absmax, "code": state.code}
    else:
        # quantize_4bit returns data as ((numel + 1) // 2, 1); store it 1-D.
        data, state = F.quantize_4bit(flat, blocksize=blocksize, compress_statistics=False, quant_type="nf4",
                                      quant_storage=torch.uint8)
        parts = {"data": data.reshape(-1), "absmax": state.absmax}
    out = {}
    for pname, (pdtype, pshape) in specs.items():
        p = parts[pname].to("cpu").contiguous().reshape(pshape)
        assert p.dtype == pdtype, (pname, p.dtype, pdtype)  # bitsandbytes changed its format
        out[pname] = p
    return out


@cache
def _has_out_kernel(op: str, device_type: str) -> bool:
    """Whether bitsandbytes registered an ``out=`` kernel of ``op`` for a device type (cached)."""
    _bnb()  # bitsandbytes registers its kernels on import
    key = _DISPATCH_KEYS.get(device_type)
    query = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if key is None or query is None:
        return False  # unknown: take the allocating path, which is always correct
    return bool(query(op, key))


def _check_parts(kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], blocksize: int,
                 device: torch.device) -> None:
    specs = part_specs(kind, shape, blocksize, dtype=parts["data"].dtype if kind == "none" else None)
    if set(parts) != set(specs):
        raise ValueError(f"{kind} parts must be {sorted(specs)}, got {sorted(parts)}")
    for pname, (pdtype, pshape) in specs.items():
        p = parts[pname]
        if p.dtype != pdtype or tuple(p.shape) != pshape or p.device != device:
            raise ValueError(f"{kind} part {pname!r} must be {pdtype} {pshape} on {device} for shape "
                             f"{tuple(shape)}, blocksize {blocksize}; got {p.dtype} {tuple(p.shape)} on {p.device}")


def _dequantize_flat(kind: str, parts: dict[str, torch.Tensor], numel: int, dtype: torch.dtype,
                     blocksize: int, out: torch.Tensor | None) -> torch.Tensor:
    """Dequantize into the flat ``out`` (numel,) if given, else into a new flat tensor; return it.

    Kernels run on the current stream of ``parts``' device (bitsandbytes passes
    torch's current CUDA stream), so call this on the stream that owns ``out``.
    """
    F = _bnb()
    data = parts["data"]
    if kind == "int8":
        op = "bitsandbytes::dequantize_blockwise.out"
        state = F.QuantState(absmax=parts["absmax"], code=parts["code"], blocksize=blocksize, dtype=dtype)
        if out is not None and _has_out_kernel(op, data.device.type):
            return F.dequantize_blockwise(data, quant_state=state, out=out)  # checks out.shape == data.shape
        res = F.dequantize_blockwise(data, quant_state=state)  # CPU: allocates (numel,) of dtype
    else:
        op = "bitsandbytes::dequantize_4bit.out"
        # Flat shape: exact on every backend (see the module docstring). code=None: the nf4
        # table is built into the kernels, and building it here would cost an H2D copy per call.
        state = F.QuantState(absmax=parts["absmax"], shape=torch.Size((numel,)), code=None,
                             blocksize=blocksize, quant_type="nf4", dtype=dtype)
        # dequantize_4bit transposes its result when A.shape[0] == 1 (a compatibility shim); that
        # only hits 1-byte data (numel 2) and is harmless here: we flatten or ignore the result.
        if out is not None and _has_out_kernel(op, data.device.type):
            return F.dequantize_4bit(data, quant_state=state, out=out)
        # CPU: allocates a (1, numel) tensor of dtype (its kernel treats a 1-D shape as one row).
        res = F.dequantize_4bit(data, quant_state=state).view(numel)
    return res if out is None else out.copy_(res)


def dequantize_into(kind: str, parts: dict[str, torch.Tensor], out: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Dequantize stored parts into the preallocated ``out``.

    On CUDA this writes straight into ``out`` (bitsandbytes ``out=`` kernels);
    on CPU bitsandbytes allocates a full-size temporary that is copied in.

    Args:
        kind: ``none`` | ``int8`` | ``nf4``.
        parts: the tensors of :func:`part_specs` (dtype and shape exact), on ``out``'s device.
        out: contiguous, the original shape, float32 / bfloat16 / float16.
        blocksize: the block size the parts were quantized with.

    Returns:
        ``out``.

    Raises:
        ConfigError: unknown kind or unsupported block size.
        ValueError: parts that do not match the layout, or a bad ``out``.
    """
    check_kind(kind)
    shape = tuple(out.shape)
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous (a slot view), got strides {out.stride()} for shape {shape}")
    _check_parts(kind, parts, shape, blocksize, out.device)
    if kind == "none":
        return out.copy_(parts["data"].view(shape))
    if out.dtype not in OUT_DTYPES:
        raise ValueError(f"out dtype must be one of {OUT_DTYPES}, got {out.dtype}")
    _dequantize_flat(kind, parts, out.numel(), out.dtype, blocksize, out.view(-1))  # (numel,) view
    return out


def dequantize(kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
               blocksize: int) -> torch.Tensor:
    """Dequantize stored parts into a new tensor of ``shape``/``dtype`` on the parts' device.

    Args:
        kind: ``none`` | ``int8`` | ``nf4``.
        parts: the tensors of :func:`part_specs`.
        shape: the original shape.
        dtype: float32 / bfloat16 / float16.
        blocksize: the block size the parts were quantized with.

    Returns:
        The dequantized tensor (values identical to :func:`dequantize_into`).

    Raises:
        ConfigError: unknown kind or unsupported block size.
        ValueError: parts that do not match the layout, or a bad dtype.
    """
    check_kind(kind)
    shape = tuple(shape)
    device = parts["data"].device
    _check_parts(kind, parts, shape, blocksize, device)
    if kind == "none":
        return parts["data"].view(shape).to(dtype, copy=True)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUT_DTYPES}, got {dtype}")
    return _dequantize_flat(kind, parts, _numel(shape), dtype, blocksize, None).view(shape)


def row_span(kind: str, shape: tuple[int, ...], blocksize: int, start: int, stop: int) -> tuple[int, int]:
    """The flat element range ``[s0, e0)`` of whole quantization blocks covering rows ``[start, stop)`` of a
    tensor of ``shape`` (blocks run over the flattened tensor, so they may straddle rows)."""
    n = _numel(shape)
    row = n // shape[0] if len(shape) and shape[0] else n
    s, e = start * row, stop * row
    return (s // blocksize) * blocksize, min(n, -(-e // blocksize) * blocksize)


def dequantize_rows(kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                    blocksize: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` (of the first dimension) of a quantized tensor, dequantized into a new tensor.

    Only the quantization blocks covering those rows are expanded: one buffer of the rows' size (plus at most
    two blocks where a block straddles the range's ends). Every value equals the whole tensor's
    :func:`dequantize` (the decode is elementwise: ``code[index] · absmax[block]``). ``parts`` are trusted
    (validated once by the caller with :func:`check_parts`).

    Args:
        kind: ``int8`` | ``nf4``.
        parts: the tensors of :func:`part_specs`.
        shape: the original shape.
        dtype: float32 / bfloat16 / float16.
        blocksize: the block size the parts were quantized with.
        start, stop: the row range.
    """
    n = _numel(shape)
    row = n // shape[0] if len(shape) and shape[0] else n
    s0, e0 = row_span(kind, shape, blocksize, start, stop)
    per_byte = 2 if kind == "nf4" else 1  # nf4: two codes a byte (s0 and e0 are even: blocks are even, n is)
    sub = {"data": parts["data"][s0 // per_byte:e0 // per_byte],
           "absmax": parts["absmax"][s0 // blocksize:-(-e0 // blocksize)]}
    if "code" in parts:
        sub["code"] = parts["code"]
    flat = _dequantize_flat(kind, sub, e0 - s0, dtype, blocksize, None)
    s, e = start * row, stop * row
    if (s, e) != (s0, e0):
        flat = flat[s - s0:e - s0]
    return flat.view(stop - start, *shape[1:])


def check_parts(kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], blocksize: int) -> None:
    """Raise ``ValueError`` unless ``parts`` match :func:`part_specs` for ``shape`` (dtype, shape, one device)."""
    check_kind(kind)
    _check_parts(kind, parts, tuple(shape), blocksize, parts["data"].device)
