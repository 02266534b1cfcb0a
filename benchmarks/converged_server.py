"""Learn -> visible latency through the real server (uvicorn, HTTP, the `openai`-shaped routes), and
served request latency with user rows vs the plain served backbone, in one run. Prints one JSON record.

    python benchmarks/converged_server.py                                      # small random model (byte tokenizer)
    python benchmarks/converged_server.py --preset configs/bench/converged_cpu.yaml   # SmolLM2-135M-Instruct, the
                                                                               # preset's user rows and learning settings

Two servers in one process: the model with user rows (`/v1/memory/learn`, requests with `user`)
and the plain backbone (the same weights, no memory). Per repeat, for a user who has learned
nothing yet: POST /v1/memory/learn with one of its facts, then at once a streamed completion of the
fact's cue for that user -- `learn_to_first_token_s` is the time from sending the learn request to
the first token of that response (computed by a forward pass that reads the new rows),
`learn_to_next_response_s` to its last token; then, interleaved, the same cue as a request of
the plain backbone, of that user (its rows read) and of no user on the memory model. Medians.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


def load(preset: str | None, d_model: int, layers: int, steps: int | None):
    """(model, plain backbone sharing its weights, tokenizer, LearnConfig, canary, facts)."""
    from memstack.engine.user_memory import LearnConfig
    from memstack.evals.personal_facts import heldout_texts, user_facts

    if preset:
        import yaml

        from memstack.config import from_dict
        from memstack.evals.converged import ConvergedConfig, build

        data = {k: v for k, v in yaml.safe_load(Path(preset).read_text()).items() if k != "kind"}
        cfg = from_dict(ConvergedConfig, data, what="converged preset")
        model, plain, tok = build(cfg)
        learn = LearnConfig(lr=cfg.lr, steps=steps or cfg.steps, max_row_update_norm=cfg.max_row_update_norm,
                            drift_threshold=cfg.drift_threshold, rate_per_min=10_000, max_tokens=512)
        what = f"{cfg.backbone}, user rows after block {list(cfg.layers)}, {preset}"
    else:
        from memstack.backbone.model import build_model
        from memstack.config import BackboneConfig, ModelConfig
        from memstack.data.tokenizers import get_tokenizer
        from memstack.memory.sparse.config import EngramConfig

        tok = get_tokenizer("byte")
        torch.manual_seed(0)
        b = BackboneConfig(vocab_size=tok.vocab_size, d_model=d_model, n_layers=layers, n_heads=4, seg_len=256)
        model = build_model(ModelConfig(b, (EngramConfig(layers=(layers - 1,), heads=4, head_dim=16,
                                                         user_rows_per_head=257, value_init_std=0.1),))).eval()
        plain = model.without_memories([0]).eval()
        learn = LearnConfig(steps=steps or 8, rate_per_min=10_000)
        what = f"d{d_model} L{layers} byte, random"
    canary = [[tok.eot_id] + tok.encode(t)[:128] for t in heldout_texts(2, set())]   # as `memstack serve`
    facts = [f for fs in user_facts(24, 1, seed=1) for f in fs]
    return model, plain, tok, learn, canary, facts, what


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="a `kind: converged` bench preset (its backbone, user rows, lr, steps)")
    ap.add_argument("--steps", type=int, default=None, help="updates per learn (default: the preset's, else 8)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens of each timed response")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    from memstack.engine import Engine, EngineConfig
    from memstack.engine.user_memory import UserMemory
    from memstack.server import Server, ServerConfig, Tenants
    from memstack.server.tenants import Tenant

    load0 = os.getloadavg()
    model, plain, tok, learn, canary, facts, what = load(a.preset, a.d_model, a.layers, a.steps)
    tok_id = getattr(tok, "name", "") or type(tok).__name__
    if a.repeats + 1 > len(facts):
        raise SystemExit(f"--repeats must be at most {len(facts) - 1}")
    ecfg = EngineConfig(block_size=16, num_blocks=256, max_model_len=256)
    eng, eng_plain = Engine(model, ecfg, tokenizer=tok_id), Engine(plain, ecfg, tokenizer=tok_id)
    key = "sk-bench-0123456789abcdef"
    tenants = Tenants([(hashlib.sha256(key.encode()).digest(), Tenant("bench", users=tuple(f"u{i}" for i in range(64))))])
    tmp = tempfile.TemporaryDirectory()
    mem = UserMemory(eng.serving, Path(tmp.name) / "users", learn, canary)
    scfg = ServerConfig(port=0, log_level="warning", access_log=False)
    srv = Server(eng, tok, scfg, tenants, mem).start()
    srv_plain = Server(eng_plain, tok, scfg, tenants).start()

    def post(url, path, body, stream=False):
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        r = urllib.request.urlopen(req, timeout=600)
        if stream:
            return r
        with r:
            return json.loads(r.read())

    def complete(url, prompt, user=None, t0=None):
        """(seconds to the first streamed token, seconds to the end), from t0 (default: now)."""
        t0 = time.perf_counter() if t0 is None else t0
        body = {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        first = None
        with post(url, "/v1/completions", {**body, **({"user": user} if user else {})}, stream=True) as r:
            for line in r:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]" and first is None:
                    first = time.perf_counter() - t0
        return first, time.perf_counter() - t0

    try:
        complete(srv.url, facts[-1].cue, "u63")             # warm up both servers and the learner
        complete(srv_plain.url, facts[-1].cue)
        post(srv.url, "/v1/memory/learn", {"user": "u63", "facts": [facts[-1].text]})
        rec: dict[str, list[float]] = {k: [] for k in ("learn_http_s", "learn_s", "learn_to_first_token_s",
                                                       "learn_to_next_response_s", "plain_s", "user_rows_s",
                                                       "no_user_s", "plain_ttft_s", "user_rows_ttft_s")}
        rolled, phases = 0, []
        for i in range(a.repeats):
            f, user = facts[i], f"u{i}"
            t0 = time.perf_counter()
            out = post(srv.url, "/v1/memory/learn", {"user": user, "facts": [f.text]})
            rec["learn_http_s"].append(time.perf_counter() - t0)
            first, end = complete(srv.url, f.cue, user, t0)   # the next request, reading the new rows
            rec["learn_to_first_token_s"].append(first)
            rec["learn_to_next_response_s"].append(end)
            rec["learn_s"].append(out["latency_s"])
            rolled += bool(out["rolled_back"])
            phases.append(out["phases_s"])
            for k, url, u in (("plain", srv_plain.url, None), ("user_rows", srv.url, user), ("no_user", srv.url, None)):
                first, end = complete(url, f.cue, u)
                rec[f"{k}_s"].append(end)
                if f"{k}_ttft_s" in rec:
                    rec[f"{k}_ttft_s"].append(first)
        med = {k: statistics.median(v) for k, v in rec.items()}
        out = {"what": "converged server", "model": what, "steps": learn.steps, "repeats": a.repeats,
               "max_tokens": a.max_tokens, **med,
               "user_rows_overhead_vs_plain": med["user_rows_s"] / med["plain_s"] - 1,
               "user_table_read_overhead": (med["user_rows_s"] - med["no_user_s"]) / med["plain_s"],
               "learn_phases_s": {p: statistics.median(d[p] for d in phases) for p in phases[0]}, "rolled_back": rolled, "threads": torch.get_num_threads(), "loadavg_start": load0,
               "loadavg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "samples": rec}
        print(json.dumps(out))
    finally:
        srv.stop()
        srv_plain.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
