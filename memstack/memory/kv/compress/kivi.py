"""KIVI (Liu et al., arXiv 2402.02750): tuning-free asymmetric 2/4-bit KV quantization.

Keys per channel (scale/zero per head-dim channel over a block's tokens), values per token
(scale/zero per token over its channels); the most recent `recent` tokens stay in full
precision (the residual window) and whole blocks are quantized once they leave it. The
representation is per block: a paged cache holds quantized blocks (codes + scales) and
full-precision blocks side by side, and frees a block's full-precision storage when it is
quantized.

Deviations: the quantization group along tokens is the cache block (KIVI groups G tokens, G=32
in the paper); blocks are quantized at segment ends (the paper quantizes as soon as a group of
the residual fills), so chunked decoding equals whole-segment processing.
"""
from __future__ import annotations

from torch import Tensor

from memstack.ops.kv_quant import dequantize, quantize


def quantize_blocks(kv: Tensor, bits: int) -> tuple[Tensor, ...]:
    """kv (..., L, 2, Hkv, bs, hd) full-precision blocks -> (k codes, k scale, k zero, v codes,
    v scale, v zero): keys per channel (scale (..., L, Hkv, 1, hd)), values per token
    (scale (..., L, Hkv, bs, 1))."""
    k, v = kv.select(-4, 0), kv.select(-4, 1)                                    # (..., L, Hkv, bs, hd)
    kc, ks, kz = quantize(k, bits, dim=-2)
    vc, vs, vz = quantize(v, bits, dim=-1)
    return kc, ks, kz, vc, vs, vz


def dequantize_keys_values(kc: Tensor, ks: Tensor, kz: Tensor, vc: Tensor, vs: Tensor, vz: Tensor,
                           bits: int) -> tuple[Tensor, Tensor]:
    return dequantize(kc, ks, kz, bits), dequantize(vc, vs, vz, bits)
