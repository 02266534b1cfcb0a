"""`memstack gqa` and `memstack adapter ...`: commands that turn one checkpoint into another --
MHA into GQA/MQA by pooling K/V heads (backbone/gqa.py), and a memory trained on a frozen
backbone into an adapter-only checkpoint, or a Hugging Face PEFT prefix-tuning adapter
(adapters.py, hf/peft.py)."""
from __future__ import annotations

import argparse
import json

GQA_EPILOG = """examples:
  memstack gqa --checkpoint runs/gqa/mha --kv-heads 2 --out runs/gqa/gqa2      # mean-pool K/V heads
  memstack gqa --checkpoint runs/gqa/mha --kv-heads 1 --method first --out runs/gqa/mqa-first
  memstack train --config gqa_base --out runs/gqa/gqa2-up init_from=runs/gqa/gqa2 model.n_kv_heads=2 \\
      train.max_steps=30 train.warmup_steps=3                                     # uptrain (~5% of 600 steps)
"""


def cmd_gqa(args: argparse.Namespace) -> int:
    from memstack.backbone.gqa import convert_kv_heads, kv_bytes_per_token
    from memstack.checkpoint import save_checkpoint
    from memstack.train.run import latest_checkpoint, load_for_inference

    src = latest_checkpoint(args.checkpoint)
    model, meta, _ = load_for_inference(src, "cpu")
    new = convert_kv_heads(model, args.kv_heads, args.method, seed=args.seed)
    b0, b1 = model.cfg.backbone, new.cfg.backbone
    keep = {k: v for k, v in meta.items() if k in ("task", "tokenizer", "tokenizer_fingerprint", "pretrained")}
    save_checkpoint(new, args.out, meta={**keep, "converted_from": str(src), "kv_heads_from": b0.kv_heads,
                                         "kv_heads": b1.kv_heads, "kv_pooling": args.method})
    print(json.dumps({"out": args.out, "kv_heads": [b0.kv_heads, b1.kv_heads], "method": args.method,
                      "kv_bytes_per_token_fp32": [kv_bytes_per_token(b0), kv_bytes_per_token(b1)],
                      "params": [model.num_params(), new.num_params()]}, indent=1))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("gqa", help="convert a checkpoint's attention to GQA / MQA by pooling K/V heads",
                       description="Convert the attention of a checkpoint to fewer KV heads (arXiv 2305.13245): each "
                       "new KV head is the mean of the K/V projections of its group of heads (or the first of them, or "
                       "a random draw -- the paper's ablation). Every other weight is copied. Uptrain the result "
                       "briefly with `memstack train ... init_from=OUT model.n_kv_heads=G`.",
                       epilog=GQA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a training out_dir")
    s.add_argument("--kv-heads", type=int, required=True, help="KV heads of the result: 1 = MQA; must divide the "
                   "model's KV head count")
    s.add_argument("--method", default="mean", choices=["mean", "first", "random"],
                   help="how a group's K/V projections become one (default: mean, the paper's choice)")
    s.add_argument("--seed", type=int, default=0, help="seed of --method random")
    s.add_argument("--out", required=True, help="directory of the converted checkpoint")
    s.set_defaults(fn=cmd_gqa)
