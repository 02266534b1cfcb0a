"""Memory ablation: every memory is switched off through the interface (`Memory.ablate`: closed to
an identity, reset at every segment, or zeroed parameters), the ablated model is a copy, and the
switch is exact: XL reset at every segment is the plain backbone; latents reset at every segment
are each segment from a fresh Z0. (tests/contract checks every registered memory: the ablated
model differs from the full one, and equals the plain backbone where the memory closes.) The CLI (`eval --ablate-memory`) and the harness (`ablate: true`) report both evaluations."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.evals.ablation import ablated, evaluate_with_ablation
from memstack.memory.base import Step
from memstack.registry import MEMORIES, memory_config
from tolerances import assert_close

S = 8
B = BackboneConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, seg_len=S)


def build(kind, **fields):
    torch.manual_seed(0)
    m = build_model(ModelConfig(B, (memory_config(kind, **fields),)))
    with torch.no_grad():
        for p in m.memory.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def segments(model, tokens, state=None, resets=None):
    outs = []
    for s in range(tokens.shape[1] // S):
        o, state = model(tokens[:, s * S:(s + 1) * S], state, Step(reset=(resets or {}).get(s)))
        outs.append(o.logits)
    return outs, state


def ablate(kind: str) -> str:
    return MEMORIES.target_class(kind)(MEMORIES.default_config(kind), B).ablate().value


@pytest.mark.parametrize("kind,mode", [("none", "identity"), ("xl", "reset"), ("compressive", "reset"), ("lm2", "identity"),
                                       ("latents", "reset"), ("memory_tokens", "zero"), ("prefix", "zero"),
                                       ("kv_dense", "reset"), ("engram", "identity"), ("retro", "identity"),
                                       ("pkm", "identity"), ("knn_lm", "identity")])
def test_modes(kind, mode):
    assert ablate(kind) == mode


def test_every_registered_memory_has_a_mode():
    for kind in MEMORIES.names():
        assert ablate(kind) in ("reset", "identity", "zero")


def test_xl_reset_at_every_segment_is_the_plain_backbone():
    m = build("xl", mem_len=3 * S)
    plain = build_model(ModelConfig(B, ())).eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    tokens = torch.randint(0, 53, (2, 3 * S))
    off = ablated(m)
    with torch.no_grad():
        got, _ = segments(off, tokens)
        normal, _ = segments(m, tokens)
    for s in range(3):
        assert_close(got[s], plain(tokens[:, s * S:(s + 1) * S])[0].logits)
    assert (normal[2] - got[2]).abs().max() > 1e-4            # the memory did matter


def test_latents_reset_keeps_positions_and_starts_every_segment_from_a_fresh_z0():
    m = build("latents", n_latents=4, n_heads=2)
    tokens = torch.randint(0, 53, (2, 3 * S))
    with torch.no_grad():
        got, st = segments(ablated(m), tokens)
        for s in range(3):
            fresh = m.init_state(2)
            fresh.pos.fill_(s * S)
            want, _ = m(tokens[:, s * S:(s + 1) * S], fresh)
            assert_close(got[s], want.logits)
    assert torch.equal(st.pos, torch.full((2,), 3 * S))


def test_stateless_memories_are_zeroed_in_a_copy():
    for kind in ("memory_tokens", "prefix"):
        m = build(kind)
        off = ablated(m)
        assert off.ablation == {kind: "zero"}
        assert all(float(p.detach().abs().max()) == 0 for p in off.memory.parameters())
        assert all(float(p.detach().abs().max()) > 0 for p in m.memory.parameters())        # original untouched
    # zero memory tokens: tokens whose keys and values are 0 (a share of attention, no content)
    m = build("memory_tokens", n_tokens=3)
    tokens = torch.randint(0, 53, (1, S))
    with torch.no_grad():
        got = ablated(m)(tokens)[0].logits
        m.memory.memories[0].tokens.zero_()
        want = m(tokens)[0].logits
    assert_close(got, want)


def test_evaluate_with_ablation_on_a_task():
    from memstack.evals.segment_ar import SegmentARTaskConfig
    from memstack.evals.task import build_task

    task = build_task(SegmentARTaskConfig(vocab=53, num_pairs=2, n_test=16), S)
    none = build("none")
    r = evaluate_with_ablation(task, none)
    assert r["ablation"] == {"none": "identity"} and r["metrics"] == r["ablated"] and r["delta"] == {"acc": 0.0}
    xl = build("xl", mem_len=4 * S)
    r = evaluate_with_ablation(task, xl)
    assert r["ablation"] == {"xl": "reset"} and set(r["ablated"]) == {"acc", "exact"}
    assert r["delta"]["acc"] == pytest.approx(r["ablated"]["acc"] - r["metrics"]["acc"])
    assert not xl.training


def test_cli_eval_ablate_memory(tmp_path):
    from memstack.cli import main
    from memstack.train.run import run_config_from_dict, run_training

    cfg = {"model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "seg_len": 16},
           "memories": [{"kind": "xl", "mem_len": 16}],
           "task": {"kind": "mqar", "vocab": 64, "seq_len": 32, "num_kv_pairs": 4, "n_train": 64, "n_test": 16},
           "train": {"lr": 3e-3, "max_steps": 2, "warmup_steps": 1, "batch_size": 4, "progress": False},
           "device": "cpu", "out_dir": str(tmp_path / "run")}
    run_training(run_config_from_dict(cfg), progress=False)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--ablate-memory", "--device", "cpu"]) == 0
    out = json.loads(buf.getvalue())
    assert set(out) == {"metrics", "ablated", "ablation", "delta"} and out["ablation"] == {"xl": "reset"}
    buf2 = io.StringIO()
    with contextlib.redirect_stdout(buf2):
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert json.loads(buf2.getvalue()) == out["metrics"]


def test_harness_records_and_reports_the_ablation(tmp_path):
    from memstack.evals.bench import SuiteConfig, run_suite
    from memstack.evals.mqar import MQARTaskConfig
    from memstack.evals.report import write_report
    from memstack.train.config import TrainConfig

    suite = SuiteConfig(name="abl", backbone=BackboneConfig(d_model=16, n_layers=1, n_heads=2, seg_len=16),
                        memories=("none", "xl"), memory_configs={"xl": {"mem_len": 16}},
                        tasks=(MQARTaskConfig(vocab=64, seq_len=32, num_kv_pairs=4, n_train=64, n_test=16),),
                        train=TrainConfig(batch_size=4, n_segments=1), lrs=(0.003,), tokens_per_cell=4 * 32,
                        time_budget_s=None, device="cpu", ablate=True)
    records = run_suite(suite, tmp_path, progress=False, log=lambda *_: None)
    assert [r["ablation"] for r in records] == [{"none": "identity"}, {"xl": "reset"}]
    assert records[0]["metrics_ablated"] == records[0]["metrics"]
    write_report(records, tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "[memory off]" in md and "](memory_ablation.png)" in md
    assert (tmp_path / "memory_ablation.png").read_bytes()[:4] == b"\x89PNG"
