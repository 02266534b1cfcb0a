"""Choices on validation users for the converged suite (evals/converged.py); results go on test users.

Each learning approach's hyperparameters are chosen on the validation users alone (disjoint from
the test users: personal_facts.split_users), each candidate on a fresh stream of those users
(the same facts, mentions and backbone as the test run):

    tables   lr x updates per mention (`lr_grid` x `steps_grid`; the serving path, drift guard on)
    lora     learning rate (`lora_lr_grid`), at the tables' chosen updates per mention
    full_ft  learning rate (`ft_lr_grid`), at the same updates per mention

The rule (`choose`): the highest validation recall after the last mention among candidates whose
validation held-out bits per byte rose at most `bpb_budget` (the issue's target: 1 %); ties go to
the smaller rise. When no candidate stays within the budget, the one with the smallest rise is
taken (and the record says the budget was not met). An approach with a single candidate is
recorded as "not chosen" (the config's value, used as given).

Choices are written to `validation.json` as soon as they are made; a later run of the same
configuration can take them from there (`validation_from`) instead of sweeping again -- refused,
with every difference, unless everything the choices depend on is the same.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, fields
from pathlib import Path

from memstack.errors import ConfigError
from memstack.evals.converged_ft import full_ft_pass

# what validation results depend on: the same values are required to reuse them
VALIDATION_FIELDS = ("backbone", "seg_len", "users", "val_users", "facts_per_user", "mentions", "seed", "layers",
                     "addressing", "n_keys", "identity_rows", "knn", "orders", "heads", "head_dim", "rows_per_head",
                     "user_rows_per_head", "value_init_std", "table_init_std", "lr", "steps", "lr_grid",
                     "steps_grid", "max_row_update_norm", "drift_threshold", "heldout", "heldout_tokens", "lora_r",
                     "lora_lr", "lora_lr_grid", "ft_lr", "ft_lr_grid", "bpb_budget", "knowledge")


def choose(cands: list[dict], budget: float) -> dict:
    """cands: [{"recall": r, "bpb_change": c, ...}] -> the chosen one (see the module docstring)."""
    if not cands:
        raise ValueError("no candidates to choose from")
    ok = [c for c in cands if c["bpb_change"] <= budget]
    if ok:
        return max(ok, key=lambda c: (c["recall"], -c["bpb_change"]))
    return min(cands, key=lambda c: (c["bpb_change"], -c["recall"]))


def _stream_candidate(shared, root: Path, tag: str, approach: str, base_bpb: float, **hp) -> dict:
    from memstack.evals.converged import Harness

    h = Harness(shared, root / tag, shared.val_users, tag=tag, approaches=(approach,), **hp)
    try:
        for _ in range(shared.cfg.mentions):
            for u in range(len(h.users)):
                h.teach(u)
        recall = h.recall(approach)
        bpb = statistics.mean(h.bpb(approach, u) for u in range(len(h.users)))
    finally:
        h.close()
    return {"recall": recall, "bpb_change": bpb / base_bpb - 1}


def validate(shared, root: Path, base_bpb: float, say=lambda *a: None) -> dict:
    """{approach: {"chosen": {...}, "candidates": [...], "selected_on_validation": bool, ...}} for
    tables (also used by tables_rag), lora and full_ft, as far as the config's approaches need them."""
    from memstack.evals.converged import Harness

    cfg = shared.cfg
    ap = set(cfg.approaches)
    out: dict = {}

    def sweep(name: str, grid: list[dict], measure) -> None:
        """Every candidate measured on the validation users (unless it is the only one); the choice."""
        cands = []
        for i, hp in enumerate(grid):
            c = dict(hp)
            if len(grid) > 1:
                c |= measure(i, hp)
                say(f"  validation {name} " + " ".join(f"{k} {v}" for k, v in hp.items())
                    + f": recall {c['recall']:.2f}, bpb {100 * c['bpb_change']:+.2f}%")
            cands.append(c)
        out[name] = _entry(cands, cfg.bpb_budget)

    steps = cfg.steps
    if ap & {"tables", "tables_rag"}:
        sweep("tables", [{"lr": lr, "steps": st} for lr in (cfg.lr_grid or (cfg.lr,))
                         for st in (cfg.steps_grid or (cfg.steps,))],
              lambda i, hp: _stream_candidate(shared, root, f"vt{i}-", "tables", base_bpb, **hp))
        steps = out["tables"]["chosen"]["steps"]
    if "lora" in ap:
        sweep("lora", [{"lr": lr, "steps": steps} for lr in (cfg.lora_lr_grid or (cfg.lora_lr,))],
              lambda i, hp: _stream_candidate(shared, root, f"vl{i}-", "lora", base_bpb, lora_lr=hp["lr"],
                                              steps=hp["steps"]))
    if "full_ft" in ap:
        def ft(i: int, hp: dict) -> dict:
            h = Harness(shared, root / f"vf{i}", shared.val_users, tag=f"vf{i}-", approaches=())
            r = full_ft_pass(h, list(range(len(h.users))), cfg.mentions, [], hp["lr"], hp["steps"], root / f"vf{i}" / "ft")
            last = r[f"hits@{cfg.mentions}"]
            return {"recall": sum(last) / len(last), "bpb_change": r["bpb"] / base_bpb - 1}

        sweep("full_ft", [{"lr": lr, "steps": steps} for lr in (cfg.ft_lr_grid or (cfg.ft_lr,))], ft)
    return out


def save_choices(path: Path, cfg, choices: dict) -> None:
    c = asdict(cfg)
    path.write_text(json.dumps({"config": {k: c[k] for k in VALIDATION_FIELDS}, "choices": choices}, indent=1))


def load_choices(path: str | Path, cfg) -> dict:
    """Choices made earlier (save_choices) for this configuration; ConfigError listing every reason not to."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"validation_from: {p} is not a file"], what="converged suite")
    try:
        data = json.loads(p.read_text())
        old, choices = data["config"], data["choices"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError([f"validation_from: {p} is not a validation.json of this suite ({e})"],
                          what="converged suite") from None
    now = json.loads(json.dumps(asdict(cfg)))                         # tuples -> lists, as stored
    # a field added since that file was written had its default there
    default = json.loads(json.dumps({f.name: f.default for f in fields(cfg)}))
    was = {k: old.get(k, default[k]) for k in VALIDATION_FIELDS}
    reasons = [f"validation_from: {k} was {was[k]!r} there, {now[k]!r} here" for k in VALIDATION_FIELDS
               if was[k] != now[k]]
    need = ({"tables"} if set(cfg.approaches) & {"tables", "tables_rag"} else set()) | (
        set(cfg.approaches) & {"lora", "full_ft"})
    reasons += [f"validation_from: no choice for {a} there" for a in sorted(need - set(choices))]
    if reasons:
        raise ConfigError(reasons, what="converged suite")
    return {a: v for a, v in choices.items() if a in need}


def _entry(cands: list[dict], budget: float) -> dict:
    if len(cands) == 1:
        return {"chosen": cands[0], "candidates": cands, "selected_on_validation": False}
    best = choose(cands, budget)
    return {"chosen": best, "candidates": cands, "selected_on_validation": True,
            "within_budget": best["bpb_change"] <= budget}


__all__ = ["choose", "validate", "save_choices", "load_choices", "VALIDATION_FIELDS"]
