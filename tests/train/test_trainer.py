"""The trainer: curriculum, bit-identical resume, checkpoint layout and crash safety, logs,
max_tokens, and the loss scaling (reported loss and gradient = those of the mean token loss).

Data: the first SOTU training documents as raw UTF-8 bytes (vocab 257, <eot> = 256), cut to
different short lengths so that documents end, rows reset and last segments are padded within
a few steps. Model: a 2-layer, width-32 backbone with Transformer-XL, so a memory state is
carried from step to step (and must survive a resume)."""
from __future__ import annotations

import copy
import functools
import json
import os

import numpy as np
import pytest
import torch

import memstack.train.trainer as trainer_mod
from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.packing import IGNORE, Batch, DocumentStream
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.learned.config import XLConfig
from memstack.memory.state import tensors
from memstack.train.config import TrainConfig
from memstack.train.trainer import Trainer

V, EOT, S, ROWS = 257, 256, 16, 4
MODEL = ModelConfig(BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S),
                    (XLConfig(mem_len=16),))


@functools.lru_cache(maxsize=None)
def sotu_bytes(n_docs: int = 10, long: bool = False) -> tuple[np.ndarray, ...]:
    from memstack.data import corpora

    docs = corpora.sotu("train")[:n_docs]
    out = []
    for i, d in enumerate(docs):
        raw = d.text.encode("utf-8")
        out.append(np.frombuffer(raw if long else raw[: 5 + 11 * i], dtype=np.uint8).astype(np.int64))
    return tuple(out)


def source(long: bool = False, seed: int = 3) -> DocumentStream:
    return DocumentStream(list(sotu_bytes(long=long)), ROWS, S, EOT, seed=seed)


def train_cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=ROWS, n_segments=2, log_every=1, progress=False,
                seed=0)
    return TrainConfig(**{**base, **kw})


def new_trainer(cfg: TrainConfig | None = None, *, model_seed: int = 0, src=None, **kw) -> Trainer:
    torch.manual_seed(model_seed)
    model = build_model(MODEL)
    return Trainer(model, cfg or train_cfg(), src if src is not None else source(), **kw)


class Recording:
    """A source wrapper that keeps every batch it served (and the n_segments asked for)."""

    def __init__(self, inner):
        self.inner, self.asked, self.batches = inner, [], []

    def next(self, n_segments: int) -> Batch:
        b = self.inner.next(n_segments)
        self.asked.append(n_segments)
        self.batches.append(b)
        return b

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.inner.load_state_dict(d)


def assert_same_training_state(a: Trainer, b: Trainer) -> None:
    """Parameters, optimizer state, carried memory state, data position and counters: bit-identical."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"parameter {k} differs"
    oa, ob = a.opt.state_dict(), b.opt.state_dict()
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) == len(list(a.model.parameters()))
    for pid in oa["state"]:
        assert oa["state"][pid].keys() == ob["state"][pid].keys()
        for name, t in oa["state"][pid].items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(ob["state"][pid][name])), f"opt state {pid}.{name}"
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    assert [g["weight_decay"] for g in oa["param_groups"]] == [g["weight_decay"] for g in ob["param_groups"]]
    ta, tb = tensors(a.state), tensors(b.state)
    assert len(ta) == len(tb) > 1
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert any(t.is_floating_point() and t.numel() for t in ta)          # a non-empty XL memory is carried
    assert a.source.state_dict() == b.source.state_dict()
    assert (a.step, a.tokens, a.target_tokens) == (b.step, b.tokens, b.target_tokens)


# ----------------------------------------------------------------------------- curriculum

def test_segments_at_follows_stages():
    cfg = TrainConfig(n_segments=3, curriculum=((0, 1), (2, 2), (4, 4)))
    assert [cfg.segments_at(s) for s in range(7)] == [1, 1, 2, 2, 4, 4, 4]
    assert [TrainConfig(n_segments=3).segments_at(s) for s in (0, 5, 1000)] == [3, 3, 3]
    assert TrainConfig(curriculum=((0, 2),)).segments_at(10**6) == 2


def test_invalid_curriculum_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        TrainConfig(curriculum=((2, 1), (1, 0)), lr=0.0)
    reasons = e.value.reasons
    assert len(reasons) == 3, reasons
    assert any("start at step 0" in r for r in reasons)
    assert any("segment counts must be >= 1" in r for r in reasons)
    assert any(r.startswith("lr must be > 0") for r in reasons)
    with pytest.raises(ConfigError, match="start at step 0"):
        TrainConfig(curriculum=((1, 2),))


def test_trainer_feeds_the_curriculum():
    rec_src = Recording(source())
    tr = new_trainer(train_cfg(curriculum=((0, 1), (2, 2), (4, 4)), max_steps=6), src=rec_src)
    recs = [tr.train_step() for _ in range(6)]
    assert [r["segments"] for r in recs] == [1, 1, 2, 2, 4, 4]
    assert rec_src.asked == [1, 1, 2, 2, 4, 4]
    assert [tuple(b.tokens.shape) for b in rec_src.batches] == [(ROWS, n, S) for n in (1, 1, 2, 2, 4, 4)]
    assert [r["tokens"] for r in recs] == list(np.cumsum([ROWS * n * S for n in (1, 1, 2, 2, 4, 4)]))
    assert [r["target_tokens"] for r in recs] == list(np.cumsum([b.n_targets for b in rec_src.batches]))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- loss scaling

def test_loss_and_gradient_are_those_of_the_mean_token_loss():
    """For three steps (padding and resets included; XL state carried in from the previous step):
    the reported loss is the mean token cross-entropy over every target of the batch, computed by
    hand with the model as it was before the step, and the gradient norm is that of this mean."""
    rec_src = Recording(source())
    tr = new_trainer(train_cfg(n_segments=3, grad_clip=0.0), src=rec_src)
    saw_padding = False
    for _ in range(3):
        before = copy.deepcopy(tr.model)
        state = tr.state if tr.state is not None else before.init_state(ROWS)
        rec = tr.train_step()
        b = rec_src.batches[-1]
        saw_padding |= bool((b.targets == IGNORE).any())
        total = torch.zeros(())
        for n in range(b.tokens.shape[1]):
            out, state = before(b.tokens[:, n], state, Step(reset=b.reset[:, n]))
            total = total + cross_entropy(out.logits, b.targets[:, n], reduction="sum")
        mean = total / b.n_targets
        assert rec["loss"] == pytest.approx(float(mean.detach()), rel=1e-5)
        mean.backward()
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in before.parameters() if p.grad is not None]))
        assert rec["grad_norm"] == pytest.approx(float(gnorm), rel=1e-4)
    assert saw_padding   # the check covered a batch whose targets are partly -100


def test_grad_clip_bounds_the_update_and_reports_the_unclipped_norm():
    tr = new_trainer(train_cfg(grad_clip=1e-3))
    rec = tr.train_step()
    assert rec["grad_norm"] > 1e-3
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.model.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


# ----------------------------------------------------------------------------- resume

def test_resume_continues_bit_for_bit(tmp_path):
    straight = new_trainer()
    recs_a = [straight.train_step() for _ in range(6)]

    first = new_trainer()
    for _ in range(3):
        first.train_step()
    first.save(tmp_path / "ckpt")
    # a new model (different init), a new optimizer, a fresh source at its start: all restored
    second = new_trainer(model_seed=123, src=source())
    second.resume(tmp_path / "ckpt")
    assert second.step == 3
    recs_b = [second.train_step() for _ in range(3)]
    assert [r["loss"] for r in recs_b] == [r["loss"] for r in recs_a[3:]]
    assert [r["grad_norm"] for r in recs_b] == [r["grad_norm"] for r in recs_a[3:]]
    assert [(r["step"], r["lr"], r["tokens"], r["target_tokens"]) for r in recs_b] == \
           [(r["step"], r["lr"], r["tokens"], r["target_tokens"]) for r in recs_a[3:]]
    assert_same_training_state(straight, second)
    assert straight.source.epoch >= 1     # the resumed half crossed an epoch (a reshuffle) too


def test_resume_from_a_step_directory_and_state_right_after_resume(tmp_path):
    tr = new_trainer()
    for _ in range(2):
        tr.train_step()
    path = tr.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "step-0000002"
    other = new_trainer(model_seed=7)
    other.resume(path)                       # the step directory itself, not the root
    assert_same_training_state(tr, other)


def latest_name(root):
    """The step `latest` names (a sealed document: memstack/atomic.py)."""
    return json.loads((root / "latest").read_text())["step"]


def test_checkpoint_layout_keeps_the_last_two(tmp_path):
    root = tmp_path / "ckpt"
    tr = new_trainer()
    for _ in range(4):
        tr.train_step()
        tr.save(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000003", "step-0000004"]
    assert latest_name(root) == "step-0000004"
    step = root / "step-0000004"
    names = {p.name for p in step.iterdir()}
    assert {"config.json", "optim.safetensors", "trainer.json", "carry.json"} <= names   # + the carried state
    assert any(n.startswith("model") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("carry") and n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith(".tmp")]
    meta = json.loads((step / "trainer.json").read_text())
    assert meta["step"] == 4 and meta["tokens"] == tr.tokens and meta["target_tokens"] == tr.target_tokens
    assert meta["source"] == tr.source.state_dict()
    # a plain model checkpoint too: loadable for inference with the trained weights
    from memstack.checkpoint import load_checkpoint
    from memstack.train.run import latest_checkpoint

    assert latest_checkpoint(tmp_path) == step
    model, _ = load_checkpoint(latest_checkpoint(root))
    for k, v in tr.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    tr = new_trainer()
    for _ in range(2):
        tr.train_step()
    tr.save(root)
    tr.train_step()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    # model weights, optimizer and carried state are written; trainer.json is not
    monkeypatch.setattr(trainer_mod, "write_sealed", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tr.save(root)
    monkeypatch.undo()
    assert latest_name(root) == "step-0000002"
    assert not (root / "step-0000003").exists()
    resumed = new_trainer(model_seed=5)
    resumed.resume(root)
    assert resumed.step == 2
    resumed.train_step()
    assert_same_training_state(tr, resumed)     # re-running step 3 lands exactly where tr is
    # and saving works again afterwards
    assert tr.save(root) == root / "step-0000003"
    assert latest_name(root) == "step-0000003"


def test_crash_while_resaving_the_same_step_keeps_a_loadable_latest(tmp_path, monkeypatch):
    """Saving again at a step that already has a checkpoint (fit() after resuming a finished run
    does exactly this) must not leave `latest` pointing at a deleted directory if it crashes."""
    root = tmp_path / "ckpt"
    tr = new_trainer()
    tr.train_step()
    tr.save(root)
    tr.train_step()
    tr.save(root)                          # latest -> step-0000002
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.path.basename(str(src)).startswith(".tmp-step"):
            raise RuntimeError("crash while publishing the checkpoint")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(trainer_mod.os, "replace", failing_replace)
    with pytest.raises(RuntimeError, match="publishing"):
        tr.save(root)
    monkeypatch.undo()
    resumed = new_trainer(model_seed=5)
    resumed.resume(root)                   # latest must still name a complete checkpoint
    assert resumed.step in (1, 2)


# ----------------------------------------------------------------------------- fit, logs, budget

def test_fit_writes_one_log_record_per_step_and_a_final_checkpoint(tmp_path):
    tr = new_trainer(train_cfg(max_steps=4, log_every=1), out_dir=tmp_path)
    last = tr.fit(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    for r in lines:
        assert {"step", "loss", "lr", "tokens", "target_tokens", "grad_norm", "segments"} <= set(r)
        assert np.isfinite(r["loss"]) and r["lr"] > 0
    assert [r["step"] for r in lines] == [1, 2, 3, 4]          # each step logged once
    assert [r["tokens"] for r in lines] == [ROWS * 2 * S * s for s in (1, 2, 3, 4)]
    assert last["step"] == 4 and tr.step == 4
    assert latest_name(tmp_path / "ckpt") == "step-0000004"


def test_fit_lr_column_follows_the_schedule(tmp_path):
    from memstack.train.optim import lr_at

    cfg = train_cfg(max_steps=5, warmup_steps=2, log_every=1)
    tr = new_trainer(cfg)
    tr.fit(progress=False)
    steps = {r["step"]: r["lr"] for r in tr.history}
    assert steps == {s: lr_at(s - 1, cfg) for s in range(1, 6)}


def test_fit_log_every_and_final_eval(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"score": float(len(calls))}

    tr = new_trainer(train_cfg(max_steps=5, log_every=2, eval_every=2), out_dir=tmp_path, evaluate=evaluate)
    last = tr.fit(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]
    assert [r.get("eval") for r in lines] == [{"score": 1.0}, {"score": 2.0}, {"score": 3.0}]
    assert calls == [False, False, False]          # evaluated in eval mode ...
    assert tr.model.training                       # ... and back to training afterwards
    assert last["eval"] == {"score": 3.0}


def test_ckpt_every_saves_during_fit(tmp_path):
    tr = new_trainer(train_cfg(max_steps=5, ckpt_every=2), out_dir=tmp_path)
    tr.fit(progress=False)
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-0000004", "step-0000005"]
    resumed = new_trainer(train_cfg(max_steps=5, ckpt_every=2), model_seed=9)
    resumed.resume(root / "step-0000004")
    resumed.fit(progress=False)
    assert_same_training_state(tr, resumed)


def test_max_tokens_stops_at_the_right_step():
    ref = new_trainer(train_cfg(max_steps=6))
    cum = [ref.train_step()["target_tokens"] for _ in range(6)]
    assert len(set(np.diff(cum))) > 1            # per-step counts vary (padding): a real count, not steps * B*N*S
    for budget, expect in [(cum[2] - 1, 3), (cum[2], 3), (cum[2] + 1, 4), (1, 1)]:
        tr = new_trainer(train_cfg(max_steps=100, max_tokens=budget))
        tr.fit(progress=False)
        assert tr.step == expect, (budget, cum)
        assert tr.target_tokens == cum[expect - 1] >= budget


def test_max_steps_stops_fit():
    tr = new_trainer(train_cfg(max_steps=3))
    rec = tr.fit(progress=False)
    assert tr.step == 3 and rec["step"] == 3
    assert tr.fit(progress=False) == {}             # already done: no further step
    assert tr.step == 3


def test_checkpoint_before_the_first_step_resumes(tmp_path):
    tr = new_trainer()
    assert tr.save(tmp_path / "ckpt") == tmp_path / "ckpt" / "step-0000000"
    resumed = new_trainer(model_seed=3)
    resumed.resume(tmp_path / "ckpt")
    assert resumed.step == 0 and resumed.state is None
    for _ in range(2):
        tr.train_step()
        resumed.train_step()
    assert_same_training_state(tr, resumed)


def test_resume_refuses_a_directory_without_a_trainer_checkpoint(tmp_path):
    from memstack.checkpoint import save_checkpoint
    from memstack.errors import CheckpointError

    tr = new_trainer()
    save_checkpoint(tr.model, tmp_path / "plain")          # a model checkpoint, not a trainer one
    with pytest.raises(CheckpointError, match="not a trainer checkpoint"):
        new_trainer().resume(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a trainer checkpoint"):
        new_trainer().resume(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- frozen backbone

def test_trainable_memory_freezes_the_backbone_and_trains_the_memory():
    from memstack.memory.learned.config import MemoryTokensConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(MODEL.backbone, (MemoryTokensConfig(n_tokens=2),)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, train_cfg(trainable="memory", max_steps=2), source())
    tr.train_step()
    tr.train_step()
    for n, p in model.named_parameters():
        if n.startswith("memory."):
            assert p.requires_grad and not torch.equal(p, before[n]), n
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n
    assert {g["group"] for g in tr.opt.param_groups} == {"no_decay"}   # only the memory tokens


def test_trainable_memory_without_memory_parameters_is_refused():
    model = build_model(ModelConfig(MODEL.backbone, (XLConfig(mem_len=8),)))
    with pytest.raises(ConfigError, match="leaves no parameter to train"):
        Trainer(model, train_cfg(trainable="memory"), source())


def test_trainable_must_be_a_known_value():
    with pytest.raises(ConfigError, match="trainable must be 'all' or 'memory'"):
        TrainConfig(trainable="backbone")
