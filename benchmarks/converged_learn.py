"""One `UserMemory.learn` on a converged preset's model: the learner's shortcut against the plain
path it replaced, interleaved in one run (medians), with each phase's share. Prints one JSON record.

    python benchmarks/converged_learn.py --preset configs/bench/converged_cpu.yaml [--repeats 6]

shortcut:  the blocks below the first one that reads a namespace (`MemoryModel.namespace_layer`)
           run once per learn, without grad; every update runs only the blocks from there on, forward
           and backward; the canary's lower blocks are computed once per model and its "before"
           loss is cached per installed table (engine/user_memory.py).
reference: the same learner with `shortcut=False` (the whole forward for every
           update and both canary passes, no cache) -- what a learn did before.
Both learn the same fact for users who have learned nothing yet (each its own namespace), so the
two paths give the same losses (checked in the record: `same_losses`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="configs/bench/converged_cpu.yaml")
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    import yaml

    from memstack.config import from_dict
    from memstack.engine.user_memory import LearnConfig, UserMemory
    from memstack.evals.converged import ConvergedConfig, build
    from memstack.evals.personal_facts import heldout_texts, user_facts

    load0 = os.getloadavg()
    data = {k: v for k, v in yaml.safe_load(Path(a.preset).read_text()).items() if k != "kind"}
    cfg = from_dict(ConvergedConfig, data, what="converged preset")
    model, _, tok = build(cfg)
    facts = [f for fs in user_facts(a.repeats + 1, cfg.facts_per_user, cfg.seed) for f in fs]
    canary = [[tok.eot_id] + tok.encode(t)[:cfg.heldout_tokens] for t in heldout_texts(2, set())]
    lc = LearnConfig(lr=cfg.lr, steps=cfg.steps, max_row_update_norm=cfg.max_row_update_norm,
                     drift_threshold=cfg.drift_threshold, rate_per_min=10_000, max_tokens=512)
    tmp = tempfile.TemporaryDirectory()
    fast = UserMemory(model, Path(tmp.name) / "shortcut", lc, canary)
    ref = UserMemory(model, Path(tmp.name) / "reference", lc, canary, shortcut=False)

    def learn(mem, name, i):
        texts = [[tok.eot_id] + tok.encode(f.text) for f in facts[i * cfg.facts_per_user:(i + 1) * cfg.facts_per_user]]
        t0 = time.perf_counter()
        out = mem.learn(f"tenant:bench/user:{name}{i}", texts, mem.rows.install)
        return time.perf_counter() - t0, out

    try:
        learn(fast, "w", a.repeats)                       # warm up (first calls of every kernel)
        learn(ref, "v", a.repeats)
        rec = {"shortcut": [], "reference": []}
        phases = {"shortcut": [], "reference": []}
        same = True
        for i in range(a.repeats):
            (t1, o1), (t2, o2) = learn(fast, "s", i), learn(ref, "r", i)
            rec["shortcut"].append(t1)
            rec["reference"].append(t2)
            phases["shortcut"].append(o1["phases_s"])
            phases["reference"].append(o2["phases_s"])
            same &= all(abs(o1[k] - o2[k]) <= 1e-4 * abs(o2[k]) for k in ("loss_first", "loss_last", "canary_after"))
        med = {k: statistics.median(v) for k, v in rec.items()}
        ph = {k: {p: statistics.median(d[p] for d in v) for p in v[0]} for k, v in phases.items()}
        out = {"what": "converged learn", "preset": a.preset, "backbone": cfg.backbone, "layers": list(cfg.layers),
               "steps": cfg.steps, "texts_per_learn": cfg.facts_per_user, "canary_tokens": [len(c) for c in canary],
               "learn_s": med, "speedup": med["reference"] / med["shortcut"], "phases_s": ph, "same_losses": same,
               "threads": torch.get_num_threads(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__, "samples": rec}
        print(json.dumps(out))
    finally:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
