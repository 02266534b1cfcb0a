"""Paged attention: queries attend to K/V read through block tables (decode, prefill, and both packed).

    paged_decode(q, k_cache, v_cache, block_tables, starts, lens, scale=None, out=None)       -> (B, H, D)
    paged_prefill(q, k_cache, v_cache, block_table, start, end, scale=None, out=None)         -> (T, H, D)
    paged_attention_varlen(q, k_cache, v_cache, block_tables, cu_seqlens, starts, ends,
                           scale=None, out=None)                                                -> (N, H, D)

Caches are (num_blocks, kv_heads, block_size, head_dim) views of the pool (memory/kv/store.py);
query head h reads KV head h // (H / kv_heads). Decode: one query per sequence b, which sees slots
[starts[b], lens[b]). Prefill: T queries of one sequence, the last T of slots [start, end),
causal. `paged_attention_varlen` packs many sequences of either kind into one call (the shape of
an engine step, like flash-attn's varlen API): sequence s owns query rows
cu_seqlens[s]:cu_seqlens[s+1] and sees [starts[s], ends[s]) of block_tables[s], causally. `out=`
takes a preallocated result (q's shape and dtype; the compiled CPU kernel writes into it, the
other paths copy into it) so a caller can keep one buffer per step.

Implementations (`set_impl` forces one; tests and benchmarks):
- "cpu": a compiled C kernel (cpu.py, cpu_kernel.c) reading K/V in place, built with the system
  compiler on first use; the default on the CPU when it builds and no gradient is needed;
- "triton": the Triton decode kernel, the default for decode on CUDA (prefill uses "torch" there);
- "torch": gather into a reused workspace + SDPA (torch_impl.py), the fallback everywhere and the
  path with autograd;
- "reference": plain fp32 loops (reference.py), the ground truth of the tests.
Nothing is probed at import time; triton is imported and the C kernel built only when first used.
"""
from __future__ import annotations

from torch import Tensor

from memstack.ops.paged_attention import cpu
from memstack.ops.paged_attention.reference import (gather_kv, paged_attention_varlen_ref, paged_decode_ref,
                                                    paged_prefill_ref)
from memstack.ops.paged_attention.torch_impl import (paged_attention_varlen_torch, paged_decode_torch,
                                                     paged_prefill_sdpa, release_workspace)

_override: str | None = None
_VALID = ("reference", "torch", "cpu", "triton")


def set_impl(name: str | None) -> None:
    global _override
    if name is not None and name not in _VALID:
        raise ValueError(f"unknown paged attention impl {name!r}; valid: {list(_VALID)}")
    _override = name


def _cpu_ok(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    return cpu.takes(q, k_cache, v_cache) and (cpu._lib is not None or cpu.load() is not None)


def decode_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor | None = None) -> str:
    """The implementation `paged_decode` uses for these inputs."""
    if _override:
        return _override
    if q.is_cuda:
        from memstack.ops.paged_attention.triton_decode import supports

        return "torch" if supports(q, k_cache) else "triton"
    return "cpu" if _cpu_ok(q, k_cache, k_cache if v_cache is None else v_cache) else "torch"


def prefill_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor | None = None, span: int | None = None) -> str:
    """The implementation `paged_prefill` (a chunk of q.shape[0] queries seeing `span` slots) and
    `paged_attention_varlen` (span None) use for these inputs. A chunk deep in a long context
    (33..span/2 queries) goes to gather + SDPA even on the CPU: its many full rows are one GEMM
    there, which beats the kernel's dot products (0.71-0.77x of contiguous SDPA for 128-512 queries
    over 1k-4k slots, against 0.84-1.02x for gather + SDPA; docs/benchmarks/runtime.md); the
    kernel wins for short chunks and for fresh prompts, where it skips the causally hidden half."""
    if _override in ("reference", "torch", "cpu"):
        return _override
    if q.is_cuda or not _cpu_ok(q, k_cache, k_cache if v_cache is None else v_cache):
        return "torch"
    if span is not None and 32 < q.shape[0] < span // 2:
        return "torch"
    return "cpu"


def _into(out: Tensor | None, res: Tensor) -> Tensor:
    if out is None:
        return res
    out.copy_(res)
    return out


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor, lens: Tensor,
                 scale: float | None = None, out: Tensor | None = None) -> Tensor:
    impl = decode_impl(q, k_cache, v_cache)
    if impl == "cpu":
        return cpu.paged_attention_cpu(q, k_cache, v_cache, block_tables, starts, lens, None, scale, out)
    if impl == "triton":
        from memstack.ops.paged_attention.triton_decode import paged_decode_triton

        return _into(out, paged_decode_triton(q, k_cache, v_cache, block_tables, starts, lens, scale))
    fn = paged_decode_ref if impl == "reference" else paged_decode_torch
    return _into(out, fn(q, k_cache, v_cache, block_tables, starts, lens, scale))


def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int,
                  scale: float | None = None, out: Tensor | None = None) -> Tensor:
    impl = prefill_impl(q, k_cache, v_cache, end - start)
    if impl == "cpu":
        import torch

        T = q.shape[0]
        if start < 0 or T > end - start:
            raise ValueError(f"paged_prefill: {T} queries need {T} visible slots, got [{start}, {end})")
        return cpu.paged_attention_cpu(q, k_cache, v_cache, block_table[None], torch.tensor([start]),
                                       torch.tensor([end]), torch.tensor([0, T]), scale, out)
    fn = paged_prefill_ref if impl == "reference" else paged_prefill_sdpa
    return _into(out, fn(q, k_cache, v_cache, block_table, start, end, scale))


def paged_attention_varlen(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens: Tensor,
                           starts: Tensor, ends: Tensor, scale: float | None = None,
                           out: Tensor | None = None) -> Tensor:
    cu = cu_seqlens.tolist()
    if len(cu) != len(starts) + 1 or len(ends) != len(starts) or len(block_tables) != len(starts) or cu[0] != 0 \
            or cu[-1] != q.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"paged_attention_varlen: cu_seqlens must rise from 0 to {q.shape[0]} (the query rows) with "
                         f"one more entry than starts/ends/block_tables rows; got cu_seqlens {len(cu)} entries "
                         f"[{cu[0] if cu else ''}..{cu[-1] if cu else ''}], {len(starts)} starts, {len(ends)} ends, "
                         f"{len(block_tables)} tables")
    impl = prefill_impl(q, k_cache, v_cache)
    if impl == "cpu":
        return cpu.paged_attention_cpu(q, k_cache, v_cache, block_tables, starts, ends, cu_seqlens, scale, out)
    fn = paged_attention_varlen_ref if impl == "reference" else paged_attention_varlen_torch
    return _into(out, fn(q, k_cache, v_cache, block_tables, cu_seqlens, starts, ends, scale))


__all__ = ["paged_decode", "paged_prefill", "paged_attention_varlen", "paged_decode_ref", "paged_prefill_ref",
           "paged_attention_varlen_ref", "paged_decode_torch", "paged_prefill_sdpa", "paged_attention_varlen_torch",
           "gather_kv", "set_impl", "decode_impl", "prefill_impl", "release_workspace"]
