"""Where does the query's gradient go? (diagnosis of the HMT claims run; measures, never asserts)

    python benchmarks/learned/hmt_grad_probe.py

Builds the claims runs' backbone (seed 0, untrained) with HMT (k = 8 sensory), HMT without
sensory memory (k = 0) and RMT with one memory token; feeds 8 one-pair segment_ar examples
(pair segment + query segment, 16 tokens each) and prints, per position of the FIRST segment,
the mean over examples of sum|d loss / d token embedding| for the loss at the query. The
key/value sit at the start of the segment, padding after it; HMT's sensory memory carries the
last 8 input embeddings of that segment into the query segment.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims  # noqa: E402


def probe(kind: str, kw: dict) -> list[float]:
    from memstack.data.synthetic.segment_ar import segment_ar
    from memstack.memory.base import Step

    run = dict(claims.RUNS["ablate_hmt"], memory=(kind, kw))
    model = claims.build(run, run["task"]().vocab_size())
    b = segment_ar(8, 1, 16, 64, 0)
    x, y = torch.as_tensor(b.inputs), torch.as_tensor(b.labels)
    embs = []
    hook = model.tok_emb.register_forward_hook(lambda m, i, o: (o.retain_grad(), embs.append(o))[1])
    state, loss = model.init_state(8), None
    for n in range(2):
        reset = torch.full((8,), n == 0, dtype=torch.bool)
        out, state = model(x[:, n * 16:(n + 1) * 16], state, Step(reset=reset))
        if n == 1:
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y[:, 16:].flatten(), ignore_index=-100)
    loss.backward()
    hook.remove()
    return embs[0].grad.abs().sum(-1).mean(0).tolist()


def main() -> None:
    torch.set_num_threads(1)
    for name, kind, kw in (("hmt (k=8)", "hmt", {}), ("hmt (k=4)", "hmt", {"n_sensory": 4}),
                           ("hmt (k=2)", "hmt", {"n_sensory": 2}), ("hmt (k=0)", "hmt", {"n_sensory": 0}),
                           ("rmt (1 token)", "rmt", {"n_tokens": 1})):
        g = probe(kind, kw)
        kv = sum(g[:4]) / 4                                          # the pair's tokens (start of the segment)
        print(f"{name:14s}", " ".join(f"{x:.3f}" for x in g), f"| pair tokens {kv:.4f}")


if __name__ == "__main__":
    main()
