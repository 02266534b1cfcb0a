"""KV quantization ops (KIVI-style): reference quantize / dequantize / pack / unpack."""
from memstack.ops.kv_quant.reference import dequantize, pack, quantize, unpack

__all__ = ["quantize", "dequantize", "pack", "unpack"]
