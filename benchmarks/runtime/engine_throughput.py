"""Engine throughput vs Hugging Face `generate()` (static cache) on the same Llama-shaped model.

    flock /tmp/memstack-timing.lock python benchmarks/runtime/engine_throughput.py

Both run the *same weights*: a random memstack backbone (RMSNorm, RoPE rotate-half, SwiGLU, GQA,
tied embeddings) copied into a `transformers.LlamaForCausalLM` of the same shape; greedy decoding
of the same prompts, so the token agreement between the two is printed as a check that the peer
really is the same model. Tokens/s counts generated tokens over wall time including prefill.
HF's peer is `generate(..., cache_implementation="static")`: a preallocated cache of
prompt + new tokens per row, run as a static batch (every row ends with the longest).

With --mixed, prompt lengths are uniform in [16, 2*prompt_len - 16] and each request asks for a
number of new tokens uniform in [8, 2*new_tokens - 8] (seeded): the engine runs each request to
its own length (continuous batching); HF's static batch is left-padded to the longest prompt and
runs max(new tokens) steps for every row. Tokens/s counts the tokens requested (sum over rows)
for both, and agreement compares each row's requested tokens.

Timing on a shared machine: each configuration runs `--reps` times, ours and HF's alternating, and
the median is kept; both wall time and this process's CPU time are recorded (both sides run on
one thread, so CPU time is what other agents' load disturbs least). `ours/hf` is the CPU-time
ratio, `ours/hf_wall` the wall-time one.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import device_info, sync, table, write_record


def hf_copy(model):
    """A transformers LlamaForCausalLM with `model`'s weights (same math, same layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    b = model.cfg.backbone
    cfg = LlamaConfig(vocab_size=b.vocab_size, hidden_size=b.d_model, intermediate_size=b.ff_dim,
                      num_hidden_layers=b.n_layers, num_attention_heads=b.n_heads, num_key_value_heads=b.kv_heads,
                      max_position_embeddings=8192, rms_norm_eps=b.norm_eps, rope_theta=b.rope_theta,
                      tie_word_embeddings=b.tie_embeddings, attention_bias=False, mlp_bias=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": blk.attn.wq.weight, p + "self_attn.k_proj.weight": blk.attn.wk.weight,
                   p + "self_attn.v_proj.weight": blk.attn.wv.weight, p + "self_attn.o_proj.weight": blk.attn.wo.weight,
                   p + "mlp.gate_proj.weight": blk.mlp.w_gate.weight, p + "mlp.up_proj.weight": blk.mlp.w_up.weight,
                   p + "mlp.down_proj.weight": blk.mlp.w_down.weight, p + "input_layernorm.weight": blk.attn_norm.weight,
                   p + "post_attention_layernorm.weight": blk.mlp_norm.weight})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--mixed", action="store_true", help="mixed prompt lengths and output lengths (see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core dev machine; "
                    "more OpenMP threads than free cores make every small op wait a scheduler tick)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions per configuration (median kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig
    from memstack.engine import Engine, EngineConfig
    from memstack.generate import SamplingConfig
    from memstack.memory.kv.config import DenseKVConfig

    dev = torch.device(args.device)
    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=2,
                       seg_len=4096, init_std=0.05)
    model = build_model(b, [DenseKVConfig(scope="document")]).eval().to(dev)
    hf = hf_copy(model.cpu()).to(dev)
    model = model.to(dev)
    n_params = model.num_params()
    rows = []
    for B in [int(x) for x in args.batches.split(",")]:
        g = torch.Generator().manual_seed(B)
        if args.mixed:
            plens = torch.randint(16, 2 * args.prompt_len - 15, (B,), generator=g).tolist()
            news = torch.randint(8, 2 * args.new_tokens - 7, (B,), generator=g).tolist()
        else:
            plens, news = [args.prompt_len] * B, [args.new_tokens] * B
        prompts = [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in plens]
        P, N = max(plens), max(news)
        eng = Engine(model, EngineConfig(block_size=16, kv_memory_mb=512, max_num_seqs=B,
                                         max_num_batched_tokens=max(2048, sum(plens)), device=str(dev)))
        eng.generate([prompts[0][:8]], SamplingConfig(max_new_tokens=2))                 # warm-up
        ids = torch.zeros(B, P, dtype=torch.long)                                         # left-padded
        mask = torch.zeros(B, P, dtype=torch.long)
        for i, pr in enumerate(prompts):
            ids[i, P - len(pr):], mask[i, P - len(pr):] = torch.tensor(pr), 1
        ids, mask = ids.to(dev), mask.to(dev)
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, cache_implementation="static", pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        ours_t, hf_t = [], []
        for _ in range(args.reps):
            t, c = time.perf_counter(), time.process_time()
            ours = eng.generate(prompts, [SamplingConfig(max_new_tokens=n) for n in news])
            sync(dev)
            ours_t.append((time.perf_counter() - t, time.process_time() - c))
            with torch.no_grad():
                t, c = time.perf_counter(), time.process_time()
                out = hf.generate(ids, attention_mask=mask, **kw)
                sync(dev)
                hf_t.append((time.perf_counter() - t, time.process_time() - c))
        t_ours, c_ours = (statistics.median(x) for x in zip(*ours_t))
        t_hf, c_hf = (statistics.median(x) for x in zip(*hf_t))
        theirs = [row[P:P + n] for row, n in zip(out.tolist(), news)]
        n = sum(news)
        agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / n
        first = sum(x[0] == y[0] for x, y in zip(ours, theirs)) / B
        rows.append({"batch": B, "ours_tok_s": n / t_ours, "hf_static_tok_s": n / t_hf, "ours_cpu_tok_s": n / c_ours,
                     "hf_cpu_tok_s": n / c_hf, "ours/hf": c_hf / c_ours, "ours/hf_wall": t_hf / t_ours,
                     "first_token_agree": first, "token_agree": agree})
    cfg = {**vars(args), "params": n_params, "transformers": transformers.__version__, "kv_heads": 2, "heads": 8}
    path = write_record("engine_throughput", cfg, rows, dev)
    print(f"device: {device_info(dev)}; model {n_params / 1e6:.1f}M params (d_model {args.d_model}, {args.layers} layers, "
          f"8 heads / 2 KV heads, vocab {args.vocab}); prompt {args.prompt_len}, {args.new_tokens} new tokens"
          f"{' (means; mixed lengths)' if args.mixed else ''}, greedy")
    print(table(rows, ["batch", "ours_cpu_tok_s", "hf_cpu_tok_s", "ours/hf", "ours_tok_s", "hf_static_tok_s",
                       "ours/hf_wall", "first_token_agree", "token_agree"]))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
