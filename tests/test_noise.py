"""Counter-based noise in chunks: each chunk's values are a pure function of (seed, step, tensor, stream, chunk),
so a draw is bit-identical whatever the number of threads that fills it."""
from __future__ import annotations

import pytest
import torch

from zoedge.optim import noise as nz


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


SHAPE = (7, nz.CHUNK // 2 + 3)  # 3.5 chunks and a ragged tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_with_1_2_and_4_threads(restore_threads, dtype):
    draws = {}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        src = nz.NoiseSource(5)
        draws[threads] = (src.normal_(torch.empty(SHAPE, dtype=dtype), 3, "layers.0.w", "z0"),
                          src.uniform_(torch.empty(SHAPE, dtype=dtype), 3, "layers.0.w", "sr"))
        if threads > 1:
            assert nz._CHUNKS.workers >= threads  # the chunks were drawn on a pool of that many threads
    for threads in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(draws[1], draws[threads])), threads


def test_each_chunk_is_its_own_counter_based_stream(restore_threads):
    torch.set_num_threads(2)
    out = nz.NoiseSource(5).normal_(torch.empty(SHAPE), 3, "w", "z0").view(-1)
    seed = nz.stream_seed(5, 3, "w", "z0")
    n = out.numel()
    for k in range((n + nz.CHUNK - 1) // nz.CHUNK):
        part = out[k * nz.CHUNK:(k + 1) * nz.CHUNK]
        ref = torch.empty(part.numel()).normal_(generator=torch.Generator().manual_seed(nz.chunk_seed(seed, k)))
        assert torch.equal(part, ref), k
    assert len({nz.chunk_seed(seed, k) for k in range(4)}) == 4
    # a small tensor is one chunk: the stream seed itself
    small = nz.NoiseSource(5).normal_(torch.empty(10, 3), 3, "b", "z0")
    assert torch.equal(small, torch.empty(10, 3).normal_(generator=torch.Generator().manual_seed(
        nz.stream_seed(5, 3, "b", "z0"))))


def test_values_do_not_depend_on_the_target_layout():
    src = nz.NoiseSource(1)
    contiguous = src.normal_(torch.empty(300, 200), 0, "w", "z0")
    strided = torch.empty(200, 300).t()
    assert torch.equal(src.normal_(strided, 0, "w", "z0"), contiguous)
