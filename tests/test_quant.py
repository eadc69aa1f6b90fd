"""Tests for zoedge.store.quant: layout, round trip, out= behaviour, rules, errors."""
from __future__ import annotations

import math

import pytest
import torch

from zoedge.errors import ConfigError
from zoedge.store import quant as q

# Shapes include sizes that are not multiples of either block size and rows
# shorter than a block (blocks straddle rows).
SHAPES = [(16, 16), (18, 17), (33, 64), (48, 80), (64, 100), (96, 576)]
KINDS = ["int8", "nf4"]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The 16 NF4 levels (bitsandbytes' table, QLoRA); the largest gap is between -1 and the next level.
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]
NF4_MAX_GAP = NF4_LEVELS[1] - NF4_LEVELS[0]


def _weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 20.0  # a few outliers, like real weights
    return w


def _ok_shape(kind: str, shape: tuple[int, ...]) -> bool:
    return kind != "nf4" or math.prod(shape) % 2 == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_parts_match_specs(kind: str, shape: tuple[int, ...]) -> None:
    if not _ok_shape(kind, shape):
        pytest.skip("nf4 needs an even element count")
    bs = q.DEFAULT_BLOCKSIZE[kind]
    specs = q.part_specs(kind, shape, bs)
    parts = q.quantize(_weight(shape).to(torch.bfloat16), kind, bs)
    assert list(parts) == list(specs)
    for name, (dtype, pshape) in specs.items():
        p = parts[name]
        assert p.dtype == dtype and tuple(p.shape) == pshape and p.device.type == "cpu", name
        assert p.is_contiguous()
    n = math.prod(shape)
    assert specs["absmax"] == (torch.float32, (-(-n // bs),))
    assert specs["data"] == (torch.uint8, (n if kind == "int8" else n // 2,))


@pytest.mark.parametrize("bs", [64, 256, 4096])
def test_int8_specs_other_blocksizes(bs: int) -> None:
    shape = (40, 50)  # 2000 values: partial last block for every bs
    parts = q.quantize(_weight(shape), "int8", bs)
    specs = q.part_specs("int8", shape, bs)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in parts.items()} == specs
    assert specs["absmax"][1] == (-(-2000 // bs),)
    assert specs["code"] == (torch.float32, (256,))


def test_int8_round_trip_error_small() -> None:
    w = _weight((96, 576))
    parts = q.quantize(w, "int8", q.DEFAULT_BLOCKSIZE["int8"])
    r = q.dequantize("int8", parts, w.shape, torch.float32, q.DEFAULT_BLOCKSIZE["int8"])
    rel = ((r - w).norm() / w.norm()).item()
    assert rel < 0.02
    # Every value lies within half the coarsest code gap of its block's range.
    absmax = parts["absmax"].repeat_interleave(q.DEFAULT_BLOCKSIZE["int8"])[: w.numel()].view(w.shape)
    assert torch.all((r - w).abs() <= 0.05 * absmax)


@pytest.mark.parametrize("shape", [s for s in SHAPES if math.prod(s) % 2 == 0])
def test_nf4_round_trip_within_step(shape: tuple[int, ...]) -> None:
    bs = q.DEFAULT_BLOCKSIZE["nf4"]
    w = _weight(shape)
    parts = q.quantize(w, "nf4", bs)
    r = q.dequantize("nf4", parts, shape, torch.float32, bs)
    absmax = parts["absmax"].repeat_interleave(bs)[: w.numel()].view(shape)
    # Round to nearest: error at most half the widest NF4 gap times the block's absmax.
    assert torch.all((r - w).abs() <= (NF4_MAX_GAP / 2) * absmax * (1 + 1e-5) + 1e-12)
    # Without outliers the relative error is the usual ~9-10% of nf4 at block size 64.
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    rg = q.dequantize("nf4", q.quantize(g, "nf4", bs), shape, torch.float32, bs)
    assert ((rg - g).norm() / g.norm()).item() < 0.13
    # absmax is each block's plain fp32 max |w| (no double quantization).
    assert torch.equal(parts["absmax"], torch.stack([c.abs().max() for c in w.reshape(-1).split(bs)]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_dequantize_into_equals_dequantize(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not _ok_shape(kind, shape):
        pytest.skip("nf4 needs an even element count")
    bs = q.DEFAULT_BLOCKSIZE[kind]
    parts = q.quantize(_weight(shape), kind, bs)
    ref = q.dequantize(kind, parts, shape, dtype, bs)
    assert ref.shape == shape and ref.dtype == dtype
    out = torch.full(shape, float("nan"), dtype=dtype)
    res = q.dequantize_into(kind, parts, out, bs)
    assert res is out
    assert torch.equal(out, ref)
    # Half-precision output is the fp32 result rounded once.
    if dtype != torch.float32:
        assert torch.equal(out, q.dequantize(kind, parts, shape, torch.float32, bs).to(dtype))


def _reference_decode(kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], bs: int) -> torch.Tensor:
    """The stored format spelled out in plain torch: code[index] * absmax of the flat block."""
    n = math.prod(shape)
    if kind == "int8":
        table, idx = parts["code"], parts["data"].long()
    else:
        table = torch.tensor(NF4_LEVELS)
        b = parts["data"].long()
        idx = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)  # high nibble first
    scale = parts["absmax"].repeat_interleave(bs)[:n]
    return (table[idx] * scale).view(shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_decode(kind: str, shape: tuple[int, ...]) -> None:
    """Exact against the format definition, also where blocks straddle rows (a CPU nf4 kernel bug
    in bitsandbytes 0.50 for 2-D shapes, avoided by dequantizing flat)."""
    if not _ok_shape(kind, shape):
        pytest.skip("nf4 needs an even element count")
    bs = q.DEFAULT_BLOCKSIZE[kind]
    parts = q.quantize(_weight(shape), kind, bs)
    ref = _reference_decode(kind, parts, shape, bs)
    assert torch.equal(q.dequantize(kind, parts, shape, torch.float32, bs), ref)
    for bs2 in (32, 128):  # other nf4 block sizes, rows shorter or not a multiple of a block
        if kind == "nf4":
            parts = q.quantize(_weight(shape), kind, bs2)
            assert torch.equal(q.dequantize(kind, parts, shape, torch.float32, bs2),
                               _reference_decode(kind, parts, shape, bs2))


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_into_slot_view(kind: str) -> None:
    """out may be a view into a bigger flat buffer (a device slot)."""
    bs = q.DEFAULT_BLOCKSIZE[kind]
    shape = (48, 80)
    parts = q.quantize(_weight(shape), kind, bs)
    slot = torch.zeros(10 + math.prod(shape) + 10, dtype=torch.bfloat16)
    view = slot[10:10 + math.prod(shape)].view(shape)
    q.dequantize_into(kind, parts, view, bs)
    assert torch.equal(view, q.dequantize(kind, parts, shape, torch.bfloat16, bs))
    assert torch.all(slot[:10] == 0) and torch.all(slot[-10:] == 0)


def test_none_kind_round_trip() -> None:
    w = _weight((20, 30)).to(torch.bfloat16)
    parts = q.quantize(w, "none", 0)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in parts.items()} == q.part_specs("none", (20, 30), 0, torch.bfloat16)
    out = torch.empty(20, 30, dtype=torch.bfloat16)
    assert torch.equal(q.dequantize_into("none", parts, out, 0), w)


def test_dequantize_into_rejects_mismatch() -> None:
    bs = q.DEFAULT_BLOCKSIZE["int8"]
    parts = q.quantize(_weight((32, 32)), "int8", bs)
    with pytest.raises(ValueError, match="absmax"):
        q.dequantize_into("int8", {**parts, "absmax": parts["absmax"].double()}, torch.empty(32, 32), bs)
    with pytest.raises(ValueError, match="data"):
        q.dequantize_into("int8", parts, torch.empty(32, 33), bs)
    with pytest.raises(ValueError, match="contiguous"):
        q.dequantize_into("int8", parts, torch.empty(32, 32).t(), bs)
    with pytest.raises(ValueError, match="parts must be"):
        q.dequantize_into("nf4", parts, torch.empty(32, 32), q.DEFAULT_BLOCKSIZE["nf4"])


def test_should_quantize_rules() -> None:
    for kind in KINDS:
        assert q.should_quantize("layers.0.self_attn.q_proj.weight", (576, 576), kind)
        assert q.should_quantize("mlp.down_proj.weight", (576, 1536), kind)
        assert q.should_quantize("fc1.weight", (16, 16), kind)
        assert not q.should_quantize("fc1.weight", (15, 64), kind)  # a side below 16
        assert not q.should_quantize("fc1.weight", (64, 8), kind)
        assert not q.should_quantize("self_attn.q_proj.bias", (576,), kind)  # 1-D
        assert not q.should_quantize("input_layernorm.weight", (576,), kind)
        assert not q.should_quantize("self_attn.q_proj.bias", (32, 32), kind)  # not a weight
        assert not q.should_quantize("weird_norm.weight", (32, 32), kind)
        assert not q.should_quantize("conv.weight", (32, 32, 3), kind)  # not 2-D
        assert not q.should_quantize("fc1.weight", (64, 64), kind, dtype=torch.int64)
        assert q.should_quantize("fc1.weight", (64, 64), kind, dtype=torch.bfloat16)
        assert not q.should_quantize("fc1.weight", (64, 64), "none")
    # nf4 packs two values a byte: an odd element count stays unquantized.
    assert q.should_quantize("fc1.weight", (17, 19), "int8")
    assert not q.should_quantize("fc1.weight", (17, 19), "nf4")


@pytest.mark.parametrize("call", [
    lambda: q.should_quantize("fc1.weight", (32, 32), "fp8"),
    lambda: q.part_specs("fp8", (32, 32), 64),
    lambda: q.quantize(torch.zeros(32, 32), "fp8", 64),
    lambda: q.dequantize_into("fp8", {}, torch.zeros(32, 32), 64),
    lambda: q.dequantize("fp8", {"data": torch.zeros(1)}, (32, 32), torch.float32, 64),
])
def test_bad_kind_raises_config_error(call) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    msg = str(info.value)
    assert info.value.what == "--quant"
    assert "'fp8'" in msg
    for allowed in q.QUANT_KINDS:
        assert allowed in msg


def test_bad_blocksize_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="4096"):
        q.part_specs("int8", (32, 32), 100)
    with pytest.raises(ConfigError, match="nf4"):
        q.quantize(torch.zeros(32, 32), "nf4", 48)


def test_defaults_are_valid() -> None:
    assert set(q.QUANT_KINDS) == {"none", "int8", "nf4"}
    for kind, bs in q.DEFAULT_BLOCKSIZE.items():
        assert bs in q.VALID_BLOCKSIZES[kind]


def test_nf4_odd_numel_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        q.part_specs("nf4", (17, 19), 64)


def test_quantize_from_any_float_dtype_uses_fp32() -> None:
    w = _weight((32, 64))
    for kind in KINDS:
        bs = q.DEFAULT_BLOCKSIZE[kind]
        a = q.quantize(w.double(), kind, bs)
        b = q.quantize(w, kind, bs)
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_cuda_dequantize_into_matches_cpu(kind: str, dtype: torch.dtype) -> None:
    """CPU-quantized parts dequantize on CUDA in place, to the CPU values."""
    bs = q.DEFAULT_BLOCKSIZE[kind]
    shape = (48, 80)
    parts = q.quantize(_weight(shape), kind, bs)
    ref = q.dequantize(kind, parts, shape, dtype, bs)
    dev = {k: v.cuda() for k, v in parts.items()}
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    q.dequantize_into(kind, dev, out, bs)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # written in place, nothing allocated
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(18, 16), (48, 80), (96, 576), (33, 64)])
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_dequantize_rows_equals_the_whole_tensor(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Any row range, aligned to the quantization blocks or straddling them, expands to exactly the whole
    tensor's values (the just-in-time expansion of the runtime is bit-equal to a whole-tensor one)."""
    if not _ok_shape(kind, shape):
        pytest.skip("nf4 needs an even element count")
    bs = q.DEFAULT_BLOCKSIZE[kind]
    parts = q.quantize(_weight(shape), kind, bs)
    whole = q.dequantize(kind, parts, shape, dtype, bs)
    rows = shape[0]
    for a, b in [(0, rows), (0, 1), (1, 2), (rows - 1, rows), (3, rows - 2), (2, 7), (5, 6)]:
        got = q.dequantize_rows(kind, parts, shape, dtype, bs, a, b)
        assert got.shape == (b - a, *shape[1:]) and torch.equal(got, whole[a:b]), (a, b)
    s0, e0 = q.row_span(kind, shape, bs, 1, 2)
    assert s0 % bs == 0 and s0 <= shape[1] and e0 >= 2 * shape[1] and e0 - s0 <= shape[1] + 2 * bs
