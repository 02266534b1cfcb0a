"""Trellis write speed: the chunkwise-parallel path against the per-token reference loop, and a
training/inference step of the tiny backbone with Trellis against the plain backbone and a
sliding-window KV cache, in the same run. CPU time per call (process_time, 1 thread) is
reported next to wall time because the machine these figures come from is shared.

    OMP_NUM_THREADS=1 flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/trellis/speed.py
"""
from __future__ import annotations

import json
import time

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.baseline import NoMemoryConfig
from memstack.memory.kv.config import DenseKVConfig, TrellisConfig
from memstack.memory.state import detach
from memstack.ops.trellis import trellis_write_chunked, trellis_write_ref


def timed(fn, n=5):
    fn()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n * 1e3, (time.perf_counter() - w0) / n * 1e3


def op_rows():
    rows = []
    B, H, m, d, T = 16, 2, 32, 16, 64
    K0, V0 = torch.randn(B, H, m, d), torch.randn(B, H, m, d)
    k, v = torch.randn(B, H, T, d, requires_grad=True), torch.randn(B, H, T, d, requires_grad=True)
    al, th = torch.rand(B, H, T) * 0.1, torch.rand(B, H, T)
    for chunk in (1, 16, 64):
        for name, fn in (("reference loop", trellis_write_ref), ("chunked", trellis_write_chunked)):
            def fwd_bwd():
                K, V = fn(K0, V0, k, v, al, th, chunk=chunk)
                (K.sum() + V.sum()).backward()
            cpu, wall = timed(fwd_bwd)
            rows.append({"what": f"write B={B} H={H} m={m} d={d} T={T}", "chunk": chunk, "impl": name,
                         "fwd+bwd cpu ms": round(cpu, 1), "wall ms": round(wall, 1)})
    return rows


def model_rows():
    rows = []
    b = BackboneConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=64)
    x = torch.randint(0, 512, (16, 64))
    for label, mem in [("none", NoMemoryConfig()), ("kv_dense window=64", DenseKVConfig(scope="document", window=64)),
                       ("trellis slots=32 write_chunk=16", TrellisConfig(slots=32)),
                       ("trellis slots=32 write_chunk=1", TrellisConfig(slots=32, write_chunk=1))]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(b, (mem,)))
        state = {"s": None}

        def train_step():
            out, st = model.train()(x, state["s"])
            out.logits.sum().backward()
            state["s"] = detach(st)

        def infer_step():
            with torch.no_grad():
                _, state["s"] = model.eval()(x, state["s"])

        tc, tw = timed(train_step)
        ic, iw = timed(infer_step)
        rows.append({"model": label, "train cpu ms": round(tc, 1), "train wall ms": round(tw, 1),
                     "infer cpu ms": round(ic, 1), "infer wall ms": round(iw, 1)})
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    for r in op_rows() + model_rows():
        print(json.dumps(r), flush=True)
