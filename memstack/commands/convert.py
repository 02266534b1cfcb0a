"""`memstack gqa` and `memstack adapter ...`: commands that turn one checkpoint into another --
MHA into GQA/MQA by pooling K/V heads (backbone/gqa.py), and a memory trained on a frozen
backbone into an adapter-only checkpoint, or a Hugging Face PEFT prefix-tuning adapter
(adapters.py, hf/peft.py)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

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


ADAPTER_EPILOG = """examples:
  memstack train --config smollm2_prefix --out runs/p    # trainable: memory also writes runs/p/adapter
  memstack adapter extract --checkpoint runs/p --pretrained smollm2 --out runs/p-adapter
  memstack adapter info --adapter runs/p/adapter
  memstack eval --checkpoint runs/p/adapter               # rebuilds SmolLM2 + the prefix, checks the fingerprint
  memstack adapter export-peft --adapter runs/p/adapter --out runs/p-peft   # PEFT prefix-tuning files
  memstack adapter import-peft --peft runs/p-peft --pretrained smollm2 --out runs/p-back
"""


def _backbone_model(args: argparse.Namespace):
    """The backbone a PEFT adapter is imported onto: --pretrained NAME, or --backbone CHECKPOINT."""
    from memstack.errors import MemstackError

    if bool(args.pretrained) == bool(args.backbone):
        raise MemstackError("give exactly one of --pretrained NAME (e.g. smollm2, hf:<dir>) or --backbone CHECKPOINT")
    if args.pretrained:
        from memstack.hf.pretrained import load_pretrained

        return load_pretrained(args.pretrained, (), seg_len=args.seg_len), {}
    from memstack.train.run import load_for_inference

    model, meta, _ = load_for_inference(args.backbone, "cpu")
    if len(model.memory):
        raise MemstackError(f"{args.backbone} has memories {list(model.memory.kinds)}; give a checkpoint of the backbone alone")
    return model, {k: meta[k] for k in ("task", "tokenizer", "tokenizer_fingerprint") if k in meta}


def cmd_adapter(args: argparse.Namespace) -> int:
    from memstack import adapters

    if args.action == "extract":
        from memstack.train.run import latest_checkpoint, load_for_inference

        src = latest_checkpoint(args.checkpoint)
        model, meta, _ = load_for_inference(src, "cpu")
        path = adapters.save_adapter(model, args.out, pretrained=args.pretrained, meta={**meta, "extracted_from": str(src)})
        doc = adapters.read_adapter(path)
        print(json.dumps({"out": str(path), "memories": [m["kind"] for m in doc["memories"]],
                          "backbone_sha256": doc["backbone_sha256"], "pretrained": doc["pretrained"]}, indent=1))
        return 0
    if args.action == "info":
        doc = adapters.read_adapter(args.adapter)
        from safetensors import safe_open

        with safe_open(str(Path(args.adapter) / doc["weights"]), "pt") as f:
            sizes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        print(json.dumps({**{k: doc[k] for k in ("pretrained", "backbone_sha256", "memories", "meta")},
                          "tensors": sizes, "parameters": sum(math.prod(s) for s in sizes.values())}, indent=1))
        return 0
    if args.action == "export-peft":
        from memstack.hf.peft import export_peft_prefix
        from memstack.train.run import load_for_inference

        model, meta, _ = load_for_inference(args.adapter, "cpu")
        out = export_peft_prefix(model, args.out, base_model=args.base_model or meta.get("pretrained"))
        print(json.dumps({"out": str(out), "files": ["adapter_config.json", "adapter_model.safetensors"]}, indent=1))
        return 0
    # import-peft
    from memstack.hf.peft import import_peft_prefix

    backbone, meta = _backbone_model(args)
    model = import_peft_prefix(args.peft, backbone)
    meta.update(imported_from_peft=str(args.peft), **({"init_from": str(args.backbone)} if args.backbone else {}))
    if args.pretrained:
        from memstack.hf.pretrained import PRETRAINED

        if args.pretrained in PRETRAINED:
            from memstack.data.tokenizers import get_tokenizer

            tok = get_tokenizer(PRETRAINED[args.pretrained].tokenizer)
            meta.update(tokenizer=tok.name, tokenizer_fingerprint=tok.fingerprint())
    path = adapters.save_adapter(model, args.out, pretrained=args.pretrained, meta=meta)
    print(json.dumps({"out": str(path), "n_prefix": model.memory.memories[-1].cfg.n_prefix}, indent=1))
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

    s = sub.add_parser("adapter", help="adapter-only checkpoints; PEFT prefix-tuning import/export",
                       description="Adapters are the memories trained on a frozen backbone (prefix, memory tokens, "
                       "tables, ...) without the backbone: a few kB-MB instead of the whole model, loaded onto the "
                       "backbone they were trained on, checked by its SHA-256 fingerprint. extract: from a full "
                       "checkpoint. info: what an adapter holds. export-peft / import-peft: a `prefix` memory as a "
                       "Hugging Face PEFT prefix-tuning adapter (adapter_config.json + adapter_model.safetensors). "
                       "`memstack eval/generate --checkpoint ADAPTER_DIR` load adapters directly.",
                       epilog=ADAPTER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["extract", "info", "export-peft", "import-peft"])
    s.add_argument("--checkpoint", help="extract: a full checkpoint (or training out_dir) with trained memories")
    s.add_argument("--adapter", help="info / export-peft: an adapter directory")
    s.add_argument("--peft", help="import-peft: a PEFT prefix-tuning adapter directory")
    s.add_argument("--pretrained", help="the registered backbone (smollm2) or hf:<dir> the adapter belongs to")
    s.add_argument("--backbone", help="import-peft: a memstack checkpoint of the backbone (instead of --pretrained)")
    s.add_argument("--seg-len", type=int, default=None, help="import-peft with --pretrained: the segment length")
    s.add_argument("--base-model", help="export-peft: base_model_name_or_path to record (default: the pretrained name)")
    s.add_argument("--out", help="output directory")
    s.set_defaults(fn=_checked_adapter)


def _checked_adapter(args: argparse.Namespace) -> int:
    from memstack.errors import MemstackError

    need = {"extract": ["checkpoint", "out"], "info": ["adapter"], "export-peft": ["adapter", "out"],
            "import-peft": ["peft", "out"]}[args.action]
    missing = [f"--{n}" for n in need if not getattr(args, n)]
    if missing:
        raise MemstackError(f"adapter {args.action} needs {', '.join(missing)}")
    return cmd_adapter(args)
