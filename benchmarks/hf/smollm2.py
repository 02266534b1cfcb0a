"""SmolLM2-135M as a memstack backbone: logits vs Hugging Face, SOTU bits per byte, speed ratio.

1. loads the pinned GGUF into a HF LlamaForCausalLM (transformers + gguf) and converts it
   (`memstack.hf.from_hf`); the conversion is cached as a memstack checkpoint (load_pretrained);
2. logits of both on a real SOTU snippet (fp32 and fp64): max |diff|;
3. SOTU test-split bits per byte through memstack's LM evaluation (segments of --seg-len tokens,
   no memory; and with a document-scoped KV memory = full context), and the same bpb computed
   from HF's own logits on the same segments;
4. forward tokens/s of memstack vs HF on the same batch, measured in the same run.
Measures, never asserts; writes a JSON record.

    .venv/bin/python benchmarks/hf/smollm2.py --out reports/hf_smollm2
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/hf_smollm2")
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--snippet", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from memstack.backbone.model import cross_entropy
    from memstack.data.corpora import sotu
    from memstack.data.tokenizers import get_tokenizer
    from memstack.evals.bench import environment
    from memstack.evals.lm import LMTask, LMTaskConfig
    from memstack.hf import from_hf
    from memstack.hf.pretrained import hf_model, load_pretrained
    from memstack.memory.kv.config import DenseKVConfig

    rec: dict = {"env": environment(torch.device("cpu")), "seg_len": args.seg_len}
    t0 = time.perf_counter()
    hf = hf_model("smollm2").eval()
    rec["hf_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = load_pretrained("smollm2", seg_len=args.seg_len).eval()
    rec["memstack_load_s"] = time.perf_counter() - t0
    tok = get_tokenizer("smollm2")
    doc = sotu("test")[0]
    ids = torch.tensor([tok.encode(doc.text)[: args.snippet]])
    rec["snippet"] = {"doc": doc.id, "tokens": ids.shape[1]}
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)[0].logits
        rec["fp32_max_abs_diff"] = (a - b).abs().max().item()
        rec["fp32_logit_scale"] = a.abs().max().item()
        rec["fp32_argmax_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        # a copy: transformers refuses .float() on a GGUF-loaded model, so `hf` itself stays fp32
        hf64 = copy.deepcopy(hf).double()
        ours64 = from_hf(hf64, seg_len=args.seg_len).double().eval()
        rec["fp64_max_abs_diff"] = (hf64(ids).logits - ours64(ids)[0].logits).abs().max().item()
        rec["fp64_logit_scale"] = hf64(ids).logits.abs().max().item()
        del hf64, ours64
    print(json.dumps({k: rec[k] for k in rec if k != "env"}, indent=1), flush=True)

    # speed: same batch, same thread count, both fp32 on CPU
    x = torch.randint(0, 49152, (2, 256))
    with torch.no_grad():
        for name, fn in [("hf", lambda: hf(x).logits), ("memstack", lambda: ours(x)[0].logits)] * 2:
            t0 = time.perf_counter()
            fn()
            rec[f"{name}_fwd_tok_s"] = x.numel() / (time.perf_counter() - t0)
    rec["speed_ratio_memstack_over_hf"] = rec["memstack_fwd_tok_s"] / rec["hf_fwd_tok_s"]

    # SOTU bits per byte (memstack's evaluation), plain segments and full context
    cfg = LMTaskConfig(tokenizer="smollm2", corpus="sotu", eval_split="test", eval_tokens=args.eval_tokens, eval_rows=4)
    task = LMTask(cfg, args.seg_len)
    t0 = time.perf_counter()
    rec["bpb_segments"] = task.evaluate(ours)
    rec["bpb_segments_s"] = time.perf_counter() - t0
    print("bpb (segments of", args.seg_len, "):", rec["bpb_segments"], flush=True)
    # the same numbers from HF's logits: each eval segment fed to HF alone
    from memstack.data.packing import IGNORE, DocumentStream

    stream = DocumentStream(task.eval_docs, cfg.eval_rows, args.seg_len, tok.eot_id, shuffle=False, loop=False)
    nbytes = torch.as_tensor(tok.token_bytes())
    nll, nb = 0.0, 0
    with torch.no_grad():
        while True:
            bt = stream.next(1)
            if bt.n_targets == 0 and stream.exhausted:
                break
            logits = hf(bt.tokens[:, 0]).logits.float()
            tgt = bt.targets[:, 0]
            nll += float(cross_entropy(logits, tgt, reduction="sum"))
            nb += int(nbytes[tgt[tgt != IGNORE]].sum())
    rec["bpb_segments_hf"] = nll / math.log(2) / nb
    full = load_pretrained("smollm2", memories=[DenseKVConfig(scope="document")], seg_len=args.seg_len).eval()
    rec["bpb_full_context"] = task.evaluate(full)
    print(json.dumps({k: v for k, v in rec.items() if k != "env"}, indent=1), flush=True)
    (out / "record.json").write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
