"""GPU checks (run on a machine with CUDA; skipped elsewhere): the compiled Triton decode kernel in
bf16 against the reference, the engine on CUDA (Triton decode, pinned-memory host tier) against
the CPU engine."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.engine import Engine, EngineConfig
from memstack.generate import SamplingConfig
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.kv.store import KVSpec, PagedKVCache
from memstack.ops.paged_attention import decode_impl, paged_decode_ref
from tolerances import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,Hkv,G,D", [(3, 1000, 8, 4, 128), (1, 33000, 2, 8, 64), (64, 77, 4, 1, 128)])
def test_triton_decode_on_gpu(dtype, B, L, Hkv, G, D):
    from memstack.ops.paged_attention.triton_decode import paged_decode_triton

    bs = 16
    nb = B * -(-L // bs)
    cache = PagedKVCache(KVSpec(2, Hkv, D, bs, dtype), nb, "cuda")
    cache.kv.normal_()
    tables = torch.randperm(nb, device="cuda").reshape(B, -1).to(torch.int32)
    kc, vc = cache.layer(1)
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=dtype)
    starts = torch.randint(0, 20, (B,), device="cuda", dtype=torch.int32)
    lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    assert decode_impl(q, kc) == "triton"
    got = paged_decode_triton(q, kc, vc, tables, starts, lens)
    assert_close(got, paged_decode_ref(q, kc, vc, tables, starts, lens), dtype=dtype)


def test_engine_on_gpu_equals_cpu():
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=512, init_std=0.3)
    model = build_model(b, [DenseKVConfig()]).eval()
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 40, 17)]
    cfg = SamplingConfig(max_new_tokens=24)
    cpu = Engine(model, EngineConfig(block_size=16, num_blocks=64, device="cpu")).generate(prompts, cfg)
    gpu = Engine(model, EngineConfig(block_size=16, num_blocks=64, device="cuda", host_cache_blocks=32))
    assert gpu.generate(prompts, cfg) == cpu
    gpu.tiers.flush()
    assert gpu.tiers.host.buf.is_pinned()
