"""The compiled CPU paged attention kernel (ops/paged_attention/cpu.py) and the packed varlen API
against the reference: decode, prefill and a packed mix, at awkward sizes (lengths not multiples
of the block size, ragged per row, visible ranges starting mid-block, GQA/MQA, head dims on the
vector path and off it), fp32 and bf16, strided caches, one and two threads, NaN-poisoned
allocations, fresh random inputs each run. Skipped where no C compiler can build the kernel."""
from __future__ import annotations

import os

import pytest
import torch

from memstack.ops import paged_attention as pa
from memstack.ops.paged_attention import cpu
from memstack.ops.paged_attention.torch_impl import workspace
from .test_paged_attention import setup_cache
from tolerances import assert_close

needs_kernel = pytest.mark.skipif(cpu.unavailable() is not None, reason=str(cpu.unavailable()))

DECODE = [  # B, H, Hkv, D, bs, lens, starts
    (4, 6, 2, 24, 16, [1, 17, 40, 33], [0, 3, 16, 20]),        # D off the vector path (scalar loop)
    (3, 9, 3, 64, 16, [16, 50, 7], [0, 0, 6]),                 # SmolLM2's heads: G = 3
    (2, 8, 1, 64, 8, [70, 31], [35, 0]),                       # MQA, G = 8 (two register groups)
    (5, 4, 4, 128, 16, [129, 1, 64, 15, 100], [1, 0, 63, 14, 0]),  # MHA, D 128
    (2, 6, 2, 48, 5, [23, 11], [4, 10]),                       # D 48 (vector path, general D), block 5
]


def _inputs(B, H, Hkv, D, bs, lens, starts, dtype):
    kc, vc, tables, _ = setup_cache(B, Hkv, D, bs, lens, dtype=dtype)
    return torch.randn(B, H, D, dtype=dtype), kc, vc, tables, torch.tensor(starts), torch.tensor(lens)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,D,bs,lens,starts", DECODE)
def test_kernel_decode_equals_reference(B, H, Hkv, D, bs, lens, starts, dtype, poison_empty):
    q, kc, vc, tables, st, ln = _inputs(B, H, Hkv, D, bs, lens, starts, dtype)
    got = cpu.paged_attention_cpu(q, kc, vc, tables, st, ln)
    assert got.dtype == dtype and not got.isnan().any()
    assert_close(got, pa.paged_decode_ref(q, kc, vc, tables, st, ln), dtype=dtype)
    assert pa.decode_impl(q, kc, vc) == "cpu"
    assert_close(pa.paged_decode(q, kc, vc, tables, st, ln, scale=0.3),
                 pa.paged_decode_ref(q, kc, vc, tables, st, ln, scale=0.3), dtype=dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_strided_caches(dtype, poison_empty):
    """A cache whose block rows are not contiguous (here (blocks, bs, Hkv, D) seen as (blocks, Hkv, bs,
    D)) is widened block by block into scratch: same values."""
    B, H, Hkv, D, bs, lens, starts = 3, 6, 3, 64, 16, [40, 3, 33], [2, 0, 17]
    _, kc, vc, tables, st, ln = _inputs(B, H, Hkv, D, bs, lens, starts, dtype)
    ks = kc.transpose(1, 2).contiguous().transpose(1, 2)                          # stride along bs = Hkv * D
    vs = vc.transpose(1, 2).contiguous().transpose(1, 2)
    assert ks.stride(2) == Hkv * D and torch.equal(ks, kc)
    q = torch.randn(B, H, D, dtype=dtype)
    assert_close(cpu.paged_attention_cpu(q, ks, vs, tables, st, ln), pa.paged_decode_ref(q, kc, vc, tables, st, ln),
                 dtype=dtype)


@needs_kernel
@pytest.mark.parametrize("T,start,end", [(1, 0, 1), (5, 0, 5), (7, 3, 37), (16, 16, 48), (20, 0, 33), (40, 9, 90)])
@pytest.mark.parametrize("D", [16, 64])
def test_kernel_prefill_equals_reference(T, start, end, D, poison_empty):
    H, Hkv, bs = 6, 3, 16
    kc, vc, tables, _ = setup_cache(1, Hkv, D, bs, [end])
    q = torch.randn(T, H, D)
    pa.set_impl("cpu")
    try:
        got = pa.paged_prefill(q, kc, vc, tables[0], start, end)
    finally:
        pa.set_impl(None)
    assert_close(got, pa.paged_prefill_ref(q, kc, vc, tables[0], start, end))
    assert_close(pa.paged_prefill(q, kc, vc, tables[0], start, end), got)       # default dispatch, same values


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_packs_decode_and_prefill(impl, dtype, poison_empty):
    """One call for a packed step: decode rows and prefill chunks (one spanning several 16-query
    tiles, one with no queries) at ragged lengths, against the reference and against each
    sequence alone."""
    if impl == "cpu" and cpu.unavailable():
        pytest.skip(cpu.unavailable())
    H, Hkv, D, bs = 9, 3, 64, 16
    n_q = [1, 23, 1, 0, 5, 40]                                                    # queries per sequence
    ends = [17, 23, 64, 8, 37, 57]
    starts = [0, 0, 30, 0, 3, 16]
    kc, vc, tables, _ = setup_cache(len(ends), Hkv, D, bs, ends, dtype=dtype)
    cu = torch.tensor([0] + n_q).cumsum(0)
    q = torch.randn(int(cu[-1]), H, D, dtype=dtype)
    st, en = torch.tensor(starts), torch.tensor(ends)
    pa.set_impl(impl)
    try:
        got = pa.paged_attention_varlen(q, kc, vc, tables, cu, st, en)
    finally:
        pa.set_impl(None)
    assert not got.isnan().any()
    assert_close(got, pa.paged_attention_varlen_ref(q, kc, vc, tables, cu, st, en), dtype=dtype)
    for s in range(len(ends)):
        a, b = int(cu[s]), int(cu[s + 1])
        if b > a:
            assert_close(got[a:b], pa.paged_prefill_ref(q[a:b], kc, vc, tables[s], starts[s], ends[s]), dtype=dtype)


def test_varlen_refuses_bad_offsets():
    kc, vc, tables, _ = setup_cache(2, 1, 8, 4, [5, 6])
    q = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to 3") as e:
        pa.paged_attention_varlen(q, kc, vc, tables, torch.tensor([0, 2]), torch.tensor([0, 0]), torch.tensor([5, 6]))
    assert "2 entries" in str(e.value) and "2 starts" in str(e.value)


@needs_kernel
def test_two_threads_give_the_same_bits():
    """Items (and, with fewer sequences than threads, head groups) run in parallel; each output
    row is computed by one thread in one order, so the result is bitwise the same."""
    B, H, Hkv, D, bs, lens, starts = 1, 8, 4, 64, 16, [300], [7]
    q, kc, vc, tables, st, ln = _inputs(B, H, Hkv, D, bs, lens, starts, torch.float32)
    one = cpu.paged_attention_cpu(q, kc, vc, tables, st, ln)
    q4, kc4, vc4, t4, st4, ln4 = _inputs(4, H, Hkv, D, bs, [300, 5, 77, 160], [7, 0, 0, 150], torch.float32)
    one4 = cpu.paged_attention_cpu(q4, kc4, vc4, t4, st4, ln4)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(cpu.paged_attention_cpu(q, kc, vc, tables, st, ln), one)
        assert torch.equal(cpu.paged_attention_cpu(q4, kc4, vc4, t4, st4, ln4), one4)
    finally:
        torch.set_num_threads(n)
    assert_close(one, pa.paged_decode_ref(q, kc, vc, tables, st, ln))


@needs_kernel
def test_out_is_written_in_place_and_bad_tables_are_refused():
    q, kc, vc, tables, st, ln = _inputs(2, 4, 2, 32, 16, [20, 9], [0, 0], torch.float32)
    out = torch.full_like(q, float("nan"))
    assert pa.paged_decode(q, kc, vc, tables, st, ln, out=out) is out
    assert_close(out, pa.paged_decode_ref(q, kc, vc, tables, st, ln))
    bad = tables.clone()
    bad[0, 1] = kc.shape[0]
    with pytest.raises(ValueError, match="names a block outside the cache"):
        cpu.paged_attention_cpu(q, kc, vc, bad, st, ln)
    with pytest.raises(ValueError, match="runs past its block table"):
        cpu.paged_attention_cpu(q, kc, vc, tables, st, torch.tensor([20, 16 * tables.shape[1] + 1]))


def test_gradients_and_a_missing_compiler_fall_back_to_torch(monkeypatch):
    q, kc, vc, tables, st, ln = _inputs(2, 4, 2, 32, 16, [20, 9], [0, 3], torch.float32)
    assert pa.decode_impl(q.requires_grad_(), kc, vc) == "torch"
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_why_not", None)
    assert "no C compiler ('no-such-compiler-xyz' not on PATH)" in cpu.unavailable()
    q = q.detach()
    assert pa.decode_impl(q, kc, vc) == "torch" and pa.prefill_impl(q, kc, vc) == "torch"
    assert_close(pa.paged_decode(q, kc, vc, tables, st, ln), pa.paged_decode_ref(q, kc, vc, tables, st, ln))


def test_torch_decode_reuses_its_gather_workspace(poison_empty):
    """The torch path gathers into one buffer per thread, reused across calls (no fresh allocation,
    no page faults); a smaller second call reads only what it wrote."""
    big = _inputs(3, 6, 2, 16, 16, [70, 3, 41], [0, 0, 5], torch.float32)
    small = _inputs(2, 6, 2, 16, 16, [9, 20], [2, 0], torch.float32)
    for args in (big, small, big):
        assert_close(pa.paged_decode_torch(*args), pa.paged_decode_ref(*args))
    ptr = workspace("k", 1, torch.float32, torch.device("cpu")).data_ptr()
    pa.paged_decode_torch(*small)
    assert workspace("k", 1, torch.float32, torch.device("cpu")).data_ptr() == ptr


@pytest.mark.slow
@needs_kernel
def test_a_compiler_refusing_native_flags_still_builds_the_kernel(tmp_path, monkeypatch):
    """-march=native refused (as some clang targets do): the build retries without it (a baseline
    x86-64 build: ~16 s of compiling, hence slow)."""
    import shutil

    real = shutil.which(os.environ.get("CC", "cc"))
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && {{ echo "unknown flag $a" >&2; '
                       f'exit 1; }}; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("MEMSTACK_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_why_not", None)
    assert cpu.unavailable() is None and len(list((tmp_path / "cache").glob("paged_attention-*.so"))) == 1
    q, kc, vc, tables, st, ln = _inputs(3, 9, 3, 64, 16, [40, 7, 33], [0, 2, 17], torch.float32)
    assert_close(cpu.paged_attention_cpu(q, kc, vc, tables, st, ln), pa.paged_decode_ref(q, kc, vc, tables, st, ln))
