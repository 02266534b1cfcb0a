"""ModelState and the generic state-tree utilities: tree_map, detach, byte counts, save/load."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
import torch

from memstack.backbone import build_model
from memstack.config import BackboneConfig
from memstack.errors import CheckpointError
from memstack.memory.base import Step
from memstack.memory.kv.config import DenseKVConfig
from memstack.memory.kv.dense import DenseKVState
from memstack.memory.learned.config import XLConfig
from memstack.memory.learned.xl import XLState
from memstack.memory.state import (ModelState, allocated_nbytes, detach, load_state, save_state, tensor_nbytes,
                                   tensors, to, tree_map)

V = 53


def tiny(**kw) -> BackboneConfig:
    return BackboneConfig(**{**dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.15), **kw})


def toks(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


# ----------------------------------------------------------------------------- tree utilities

@dataclass
class Inner:
    a: torch.Tensor
    per_layer: list
    n: int


@dataclass(frozen=True)
class Outer:
    x: torch.Tensor
    inner: Inner
    pair: tuple
    nothing: None = None
    label: str = "s"
    derived: int = field(default=0, init=False)


def hand_built():
    base = torch.arange(10, dtype=torch.float32)                  # 40 bytes of storage
    ints = torch.tensor([1, 2, 3], dtype=torch.int64)             # 24 bytes
    flags = torch.tensor([True, False])                           # 2 bytes
    inner = Inner(a=base[:5], per_layer=[base[2:8], ints], n=7)   # two views into `base`
    return Outer(x=base, inner=inner, pair=(flags, None, 3.5)), (base, ints, flags)


def test_tree_map_rebuilds_structure_and_keeps_non_tensors():
    s, (base, ints, flags) = hand_built()
    out = tree_map(lambda t: t * 2, s)
    assert type(out) is Outer and type(out.inner) is Inner
    assert isinstance(out.inner.per_layer, list) and isinstance(out.pair, tuple)
    assert torch.equal(out.x, base * 2)
    assert torch.equal(out.inner.a, base[:5] * 2)
    assert torch.equal(out.inner.per_layer[0], base[2:8] * 2) and torch.equal(out.inner.per_layer[1], ints * 2)
    assert torch.equal(out.pair[0], flags * 2)
    assert out.pair[1:] == (None, 3.5) and out.inner.n == 7 and out.nothing is None and out.label == "s"
    assert torch.equal(s.x, base)                                    # input untouched
    assert [t.shape for t in tensors(s)] == [(10,), (5,), (6,), (3,), (2,)]


def test_byte_counts_on_a_hand_built_state():
    s, _ = hand_built()
    # as seen: 10*4 + 5*4 + 6*4 + 3*8 + 2*1
    assert tensor_nbytes(s) == 40 + 20 + 24 + 24 + 2
    # really allocated: the three storages, views counted once
    assert allocated_nbytes(s) == 40 + 24 + 2
    # an expanded view is large as seen, small as allocated
    e = torch.zeros(3).expand(100, 3)
    assert tensor_nbytes((e,)) == 1200 and allocated_nbytes((e,)) == 12
    assert tensor_nbytes(None) == 0 and allocated_nbytes(()) == 0


def test_detach_and_to():
    w = torch.randn(4, requires_grad=True)
    s = ModelState(torch.tensor([3, 4]), (XLState((w * 2,), torch.zeros(1, 0, dtype=torch.long),
                                                 torch.zeros(1, 0, dtype=torch.bool), (w + 1,),
                                                 torch.zeros(1, 0, dtype=torch.long)),))
    d = detach(s)
    assert s.memories[0].mems[0].requires_grad and s.memories[0].pending[0].requires_grad
    assert not any(t.requires_grad for t in tensors(d))
    assert [t.data_ptr() for t in tensors(d)] == [t.data_ptr() for t in tensors(s)]   # no copies
    moved = to(d, "cpu")
    assert type(moved) is ModelState and torch.equal(moved.memories[0].mems[0], w.detach() * 2)


# ----------------------------------------------------------------------------- save / load

def _prefill_then_continue(model, dec_tokens, state):
    """Continue the current segment token by token; returns the logits."""
    outs = []
    for i in range(dec_tokens.shape[1]):
        step = Step(seg_start=False, seg_end=i == dec_tokens.shape[1] - 1)
        out, state = model(dec_tokens[:, i:i + 1], state, step)
        outs.append(out.logits)
    return torch.cat(outs, dim=1), state


def test_save_load_round_trip_mid_segment_xl_plus_kv(tmp_path, poison_empty):
    """An XL memory (two segments in) plus a segment decode cache, saved in the middle of a
    segment (XL's pending states and the cache are both live), continues identically."""
    model = build_model(tiny(), [XLConfig(mem_len=6)]).eval()
    dec = model.with_memories([DenseKVConfig(scope="segment", initial_capacity=4)])
    kinds = dec.memory.kinds
    assert kinds == ["xl", "kv_dense"]
    with torch.no_grad():
        _, state = dec(toks(2, 8))                                        # segment 1, whole
        _, state = dec(toks(2, 5), state, Step(seg_start=True, seg_end=False))   # segment 2 prefill
        assert state.memories[0].pending[0].shape[1] == 5 and state.memories[1].length == 5
        save_state(state, tmp_path / "s", kinds)
        loaded = load_state(tmp_path / "s", kinds)
        rest = toks(2, 4)
        a, sa = _prefill_then_continue(dec, rest, loaded)
        b, sb = _prefill_then_continue(dec, rest, state)
    assert torch.equal(a, b)
    assert torch.equal(sa.pos, sb.pos) and sa.pos.tolist() == [17, 17]
    for x, y in zip(tensors(sa.memories[0]), tensors(sb.memories[0])):
        assert torch.equal(x, y)


def test_save_load_round_trip_document_kv_and_structure(tmp_path):
    model = build_model(tiny(), [DenseKVConfig(scope="document", initial_capacity=4)]).eval()
    kinds = model.memory.kinds
    with torch.no_grad():
        _, state = model(toks(3, 6))
        state = model.reset_state(state, torch.tensor([False, True, False]))
        save_state(state, tmp_path / "kv", kinds)
        loaded = load_state(tmp_path / "kv", kinds)
        s0 = loaded.memories[0]
        assert type(loaded) is ModelState and type(s0) is DenseKVState
        assert isinstance(s0.k, list) and len(s0.k) == 2 and s0.length == 6 and type(s0.length) is int
        assert s0.valid[:, :6].tolist() == [[True] * 6, [False] * 6, [True] * 6]
        for x, y in zip(tensors(state), tensors(loaded)):
            assert x.dtype == y.dtype and torch.equal(x, y)
        nxt = toks(3, 5)
        a = model(nxt, loaded)[0].logits
        b = model(nxt, state)[0].logits
    assert torch.equal(a, b)


def test_load_refuses_other_memories(tmp_path):
    model = build_model(tiny(), [XLConfig(mem_len=4)])
    save_state(model.init_state(2), tmp_path / "s", model.memory.kinds)
    with pytest.raises(CheckpointError, match=r"saved for memories \['xl'\], this model has \['kv_dense'\]"):
        load_state(tmp_path / "s", ["kv_dense"])
    with pytest.raises(CheckpointError, match="no saved state"):
        load_state(tmp_path / "other", ["xl"])


def test_load_refuses_corrupted_tensor_file(tmp_path):
    model = build_model(tiny(), [XLConfig(mem_len=4)]).eval()
    with torch.no_grad():
        _, state = model(toks(2, 5))
    save_state(state, tmp_path / "s", ["xl"])
    (f,) = tmp_path.glob("s-*.safetensors")  # the manifest s.json names this content-addressed file
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_state(tmp_path / "s", ["xl"])


def test_load_refuses_corrupted_or_foreign_metadata(tmp_path):
    from memstack.atomic import write_sealed

    model = build_model(tiny(), [XLConfig(mem_len=4)])
    save_state(model.init_state(1), tmp_path / "s", ["xl"])
    j = tmp_path / "s.json"
    meta = json.loads(j.read_text())
    j.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(CheckpointError, match="has format 99; this memstack reads format 2"):
        load_state(tmp_path / "s", ["xl"])
    j.write_text(json.dumps({**meta, "kinds": ["xl", "xl"]}, indent=1) + "\n")       # an edit: the seal breaks
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_state(tmp_path / "s", ["xl"])
    # a skeleton naming a class that is not loaded is refused, not imported (even re-sealed)
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k not in ("kind", "format", "checksum")})
                      .replace("memstack.memory.learned.xl:XLState", "os:system"))
    write_sealed(j, meta["kind"], meta["format"], body)
    with pytest.raises(CheckpointError, match="not a state class of this model"):
        load_state(tmp_path / "s", ["xl"])
    j.write_text("{broken")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_state(tmp_path / "s", ["xl"])


def test_unsavable_state_field_is_reported(tmp_path):
    @dataclass
    class Bad:
        table: dict

    with pytest.raises(TypeError, match=r"state field of type dict at 'state.memories.0.table' cannot be saved"):
        save_state(ModelState(torch.zeros(1, dtype=torch.long), (Bad({}),)), tmp_path / "x", ["bad"])
    assert not list(tmp_path.iterdir())


def test_states_with_dotted_names_do_not_collide(tmp_path):
    """`save_state(path)` writes `<path>.json` and a `<name>-<sha>.safetensors` beside it: two
    paths that differ only after a dot are two different states."""
    model = build_model(tiny(), [XLConfig(mem_len=4)]).eval()
    kinds = model.memory.kinds
    with torch.no_grad():
        _, s1 = model(toks(1, 3))
        _, s2 = model(toks(1, 5))
    save_state(s1, tmp_path / "run.step1", kinds)
    save_state(s2, tmp_path / "run.step2", kinds)
    assert (tmp_path / "run.step1.json").is_file() and len(list(tmp_path.glob("run.step1-*.safetensors"))) == 1
    assert load_state(tmp_path / "run.step1", kinds).pos.tolist() == [3]
    assert load_state(tmp_path / "run.step2", kinds).pos.tolist() == [5]


def test_crash_while_saving_keeps_the_previous_state(tmp_path, monkeypatch):
    """save_state promises that a crash leaves the previous version intact: a crash after the
    new tensors are in place but before the new JSON is must not make the old state unloadable."""
    model = build_model(tiny(), [XLConfig(mem_len=4)]).eval()
    kinds = model.memory.kinds
    with torch.no_grad():
        _, old = model(toks(2, 3))
        _, new = model(toks(2, 5), old)
    save_state(old, tmp_path / "s", kinds)
    real_replace = os.replace

    def crashing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("simulated crash before the JSON is replaced")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_state(new, tmp_path / "s", kinds)
    monkeypatch.setattr(os, "replace", real_replace)
    back = load_state(tmp_path / "s", kinds)
    assert back.pos.tolist() == [3, 3]
    for x, y in zip(tensors(back), tensors(old)):
        assert torch.equal(x, y)
