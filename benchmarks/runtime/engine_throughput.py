"""Engine throughput vs Hugging Face `generate()` (static cache) on the same Llama-shaped model.

    flock /tmp/memstack-timing.lock .venv/bin/python benchmarks/runtime/engine_throughput.py
    python benchmarks/runtime/engine_throughput.py --device cuda --threads 0       # on a GPU

Both run the *same weights*: a random memstack backbone (RMSNorm, RoPE rotate-half, SwiGLU, GQA,
tied embeddings) copied into a `transformers.LlamaForCausalLM` of the same shape; greedy decoding
of the same prompts, so the token agreement between the two is recorded as the check that the peer
really is the same model. HF's peer is `generate(..., cache_implementation="static")`: a
preallocated cache of prompt + new tokens per row, run as a static batch (every row ends with the
longest). The engine is driven through its public API,
`Engine(model, EngineConfig(...)).generate(prompts, SamplingConfig(...))`, with prefix caching off
(repeats must not hit the previous repeat's blocks).

Cases (`--cases`), each at every batch size (`--batches`, default 1,16,64):
- equal: every prompt `--prompt-len` tokens, every request `--new-tokens` new tokens;
- mixed: prompt lengths uniform in [16, 2*prompt_len - 16], new tokens uniform in
  [8, 2*new_tokens - 8] per request (seeded): the engine runs each request to its own length
  (continuous batching); HF's static batch is left-padded to the longest prompt and runs the
  longest request's count for every row. Tokens/s counts the tokens requested (sum over rows).

Timing: `--reps` interleaved repeats (each repeat runs both systems, alternating which goes first)
after one warm-up of each; medians. On the CPU with one torch thread the primary timer is the
process's CPU time (robust on a shared machine; wall medians recorded beside it); on CUDA or with
more threads, wall time after synchronising. `engine/hf` = HF time / engine time (> 1: the engine
is faster). One JSON record per run (reports/benchmarks/runtime/engine_throughput-*.json or --out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import device_info, git_sha, sync, table, write_record


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


def build(args, dev):
    """The memstack model (document-scope dense KV, which the engine serves from its pool) and its HF twin."""
    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig
    from memstack.memory.kv.config import DenseKVConfig

    torch.manual_seed(0)
    b = BackboneConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, seg_len=4096, init_std=0.05)
    model = build_model(b, [DenseKVConfig(scope="document")]).eval()
    hf = hf_copy(model).to(dev)
    return model.to(dev), hf


def workload(case: str, B: int, P: int, N: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(B)
    if case == "mixed":
        plens = torch.randint(16, max(17, 2 * P - 15), (B,), generator=g).tolist()
        news = torch.randint(8, max(9, 2 * N - 7), (B,), generator=g).tolist()
    else:
        plens, news = [P] * B, [N] * B
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in plens], news


def engine_runner(model, prompts, news, dev, paged: str | None = None):
    """The engine's generate on these prompts; `paged` forces its paged attention implementation
    ("fresh": the torch path with a fresh gather buffer per call, i.e. the engine before issue 10)."""
    from memstack.engine import Engine, EngineConfig
    from memstack.generate import SamplingConfig
    from memstack.ops.paged_attention import set_impl, torch_impl

    bs = 16
    blocks = sum(-(-(len(p) + n) // bs) for p, n in zip(prompts, news)) + 8
    eng = Engine(model, EngineConfig(block_size=bs, num_blocks=blocks, max_num_seqs=len(prompts),
                                     max_num_batched_tokens=max(2048, sum(map(len, prompts))),
                                     enable_prefix_caching=False, device=str(dev)))
    params = [SamplingConfig(max_new_tokens=n) for n in news]
    if paged is None:
        return lambda: eng.generate(prompts, params)

    def run():
        set_impl("torch" if paged == "fresh" else paged)
        torch_impl.REUSE_WORKSPACE = paged != "fresh"
        try:
            return eng.generate(prompts, params)
        finally:
            set_impl(None)
            torch_impl.REUSE_WORKSPACE = True
    return run


def hf_runner(hf, prompts, news, dev):
    B, P, N = len(prompts), max(map(len, prompts)), max(news)
    ids = torch.zeros(B, P, dtype=torch.long)                                     # left-padded
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, pr in enumerate(prompts):
        ids[i, P - len(pr):], mask[i, P - len(pr):] = torch.tensor(pr), 1
    ids, mask = ids.to(dev), mask.to(dev)
    kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, cache_implementation="static", pad_token_id=0)

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, **kw)
        return [row[P:P + n] for row, n in zip(out.tolist(), news)]
    return run


def measure(runs: dict, dev, reps: int) -> tuple[dict, dict]:
    """One warm-up each, then `reps` interleaved repeats (alternating the order). Returns medians
    {name: {"wall", "cpu"}} and each system's outputs of the first timed repeat."""
    outs = {}
    for n, fn in runs.items():
        fn()
    names = list(runs)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(dev)
            c, w = time.process_time(), time.perf_counter()
            o = runs[n]()
            sync(dev)
            wall[n].append(time.perf_counter() - w)
            cpu[n].append(time.process_time() - c)
            outs.setdefault(n, o)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n])} for n in names}, outs


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="equal,mixed")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--engine-impls", default="", help="also time the engine with these paged attention impls "
                    "forced (comma list of cpu, torch, fresh, reference; 'fresh' is the path before issue 10)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core dev machine; "
                    "0: leave torch's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and workload, 1 repeat: proves the script runs")
    ap.add_argument("--out", default=None, help="write the record here instead of reports/benchmarks/runtime/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batches, args.reps, args.prompt_len, args.new_tokens = [1, 3], 1, 12, 6
        args.d_model, args.layers, args.vocab = 64, 2, 256
    import transformers

    dev = torch.device(args.device)
    model, hf = build(args, dev)
    cpu_time = dev.type == "cpu" and torch.get_num_threads() == 1
    key = "cpu" if cpu_time else "wall"
    rows = []
    for case in args.cases.split(","):
        for B in args.batches:
            prompts, news = workload(case, B, args.prompt_len, args.new_tokens, args.vocab)
            runs = {"engine": engine_runner(model, prompts, news, dev), "hf": hf_runner(hf, prompts, news, dev)}
            for impl in filter(None, args.engine_impls.split(",")):
                runs[f"engine[{impl}]"] = engine_runner(model, prompts, news, dev, impl)
            t, outs = measure(runs, dev, args.reps)
            ours, theirs = outs["engine"], outs["hf"]
            n = sum(news)
            agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / n
            rows.append({"case": case, "batch": B, "tokens": n, "engine_tok_s": n / t["engine"][key],
                         "hf_static_tok_s": n / t["hf"][key], "engine/hf": t["hf"][key] / t["engine"][key],
                         "engine/hf_wall": t["hf"]["wall"] / t["engine"]["wall"], "token_agree": agree,
                         "engine_s": t["engine"], "hf_s": t["hf"]})
            for name in runs:
                if name.startswith("engine["):
                    rows[-1][f"{name}/hf"] = t["hf"][key] / t[name][key]
                    rows[-1][f"{name}_s"] = t[name]
                    rows[-1][f"{name}_agree"] = outs[name] == ours
            print(f"{case} B={B}: engine/hf {rows[-1]['engine/hf']:.3f} (wall {rows[-1]['engine/hf_wall']:.3f}), "
                  f"agree {agree:.3f}", flush=True)
    timer = "process CPU time" if cpu_time else "wall time"
    cfg = {**{k: v for k, v in vars(args).items() if k != "out"}, "params": model.num_params(),
           "transformers": transformers.__version__, "timer": timer}
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": "engine_throughput", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "git": git_sha(), "device": device_info(dev), "torch": torch.__version__,
                                    "config": cfg, "results": rows}, indent=1))
    else:
        path = write_record("engine_throughput", cfg, rows, dev)
    print(f"device: {device_info(dev)}; model {model.num_params() / 1e6:.1f}M params (d_model {args.d_model}, "
          f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}); prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens (means if mixed), greedy; timer: {timer}, medians of "
          f"{args.reps} interleaved repeats")
    extra = [f"engine[{i}]/hf" for i in filter(None, args.engine_impls.split(","))]
    print(table(rows, ["case", "batch", "tokens", "engine_tok_s", "hf_static_tok_s", "engine/hf", "engine/hf_wall",
                       "token_agree"] + extra))
    print(f"record: {path}")
    return {"config": cfg, "results": rows}


if __name__ == "__main__":
    main()
