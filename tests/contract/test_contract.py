"""The contract every registered memory is held to (DESIGN.md, "Tests and benchmarks").

Runs over `MEMORIES.names()` x each memory's `contract_configs()`, so a newly registered memory
is tested without anyone editing this file:

- chunked processing (prefill + one token at a time, with the segment decode cache) equals
  processing each segment whole -- "cached decode equals a full forward pass";
- the training path (gradients on) and the inference path give the same outputs;
- a memory made an identity (gate closed) leaves the backbone unchanged; one without a gate
  changes the output once it has something to say;
- state survives save/load: continuing from a reloaded state equals continuing from the original;
- `MemorySpec` predicts the held state exactly and bounds the allocation;
- rows are independent, and a per-row reset makes that row equal to a fresh run -- also when the
  old document stopped mid-segment (and mid-chunk);
- the memory switches itself off for an ablation (`Memory.ablate`): the ablated model differs from
  the full one wherever the memory has an effect, and equals the plain backbone where it closes;
- the memory's parameters (if any) receive gradient from the training loss (LM + auxiliary losses);
- bad config fields are refused with every reason.
"""
from __future__ import annotations

import random

import pytest
import torch

from memstack.backbone.model import build_model, cross_entropy
from memstack.config import BackboneConfig, ModelConfig, from_dict
from memstack.errors import ConfigError
from memstack.generate import decoding_model
from memstack.memory.base import Memory, Site, Step
from memstack.memory.state import allocated_nbytes, load_state, save_state
from memstack.registry import MEMORIES
from tolerances import assert_close

S = 16  # seg_len of the contract backbone
BACKBONE = BackboneConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=S)


def _cases():
    for name in MEMORIES.names():
        for fields in MEMORIES.target_class(name).contract_configs():
            tag = "-".join(f"{k}={v}" for k, v in fields.items()) or "default"
            yield pytest.param(name, fields, id=f"{name}[{tag}]")


CASES = list(_cases())


def make(name: str, fields: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = MEMORIES.config_class(name)(**fields)
    model = build_model(ModelConfig(BACKBONE, (cfg,)))
    with torch.no_grad():  # memories may start at an identity (zero gates); move them off it
        for p in model.memory.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def run_whole(model, tokens, resets=None, state=None):
    """Each segment in one call; returns (logits (B, T, V), state)."""
    resets = resets or {}
    outs = []
    for s in range(tokens.shape[1] // S):
        out, state = model(tokens[:, s * S:(s + 1) * S], state, Step(reset=resets.get(s)))
        outs.append(out.logits)
    return torch.cat(outs, 1), state


def run_chunked(model, tokens, resets=None, rng=None):
    """Each segment as a prefill of random length, then one token at a time, through the decode cache."""
    resets, rng = resets or {}, rng or random.Random(0)
    dec = decoding_model(model)
    state, outs = dec.init_state(tokens.shape[0]), []
    for s in range(tokens.shape[1] // S):
        seg = tokens[:, s * S:(s + 1) * S]
        r = rng.randint(1, S - 1)
        pos = 0
        for chunk in [seg[:, :r]] + [seg[:, i:i + 1] for i in range(r, S)]:
            step = Step(reset=resets.get(s) if pos == 0 else None, seg_start=pos == 0, seg_end=pos + chunk.shape[1] == S)
            out, state = dec(chunk, state, step)
            outs.append(out.logits)
            pos += chunk.shape[1]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name,fields", CASES)
def test_chunked_decode_equals_whole_segments(name, fields):
    model = make(name, fields).eval()
    tokens = torch.randint(0, 97, (2, 4 * S))
    resets = {2: torch.tensor([False, True])}  # row 1 starts a new document at segment 2
    with torch.no_grad():
        whole, _ = run_whole(model, tokens, resets)
        chunked = run_chunked(model, tokens, resets)
    assert_close(chunked, whole)


@pytest.mark.parametrize("name,fields", CASES)
def test_training_path_equals_inference_path(name, fields):
    model = make(name, fields)
    tokens = torch.randint(0, 97, (2, 3 * S))
    with torch.no_grad():
        ref, _ = run_whole(model.eval(), tokens)
    got, _ = run_whole(model.train(), tokens)
    assert got.requires_grad
    assert_close(got.detach(), ref)


@pytest.mark.parametrize("name,fields", CASES)
def test_identity_or_effect(name, fields):
    model = make(name, fields).eval()
    plain = build_model(ModelConfig(BACKBONE, ())).eval()   # the same weights, no memory at all
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("memory.") for k in unexpected)
    tokens = torch.randint(0, 97, (2, 3 * S))
    with torch.no_grad():
        base = torch.cat([plain(tokens[:, s * S:(s + 1) * S])[0].logits for s in range(3)], 1)
        if all(m.make_identity() for m in model.memory.memories):
            got, _ = run_whole(model, tokens)
            assert_close(got, base)
        else:
            got, _ = run_whole(model, tokens)
            assert (got - base).abs().max() > 1e-3, f"{name} has no effect on the output"


@pytest.mark.parametrize("name,fields", CASES)
def test_ablation_switches_the_memory_off(name, fields):
    from memstack.evals.ablation import ablated

    model = make(name, fields).eval()
    plain = build_model(ModelConfig(BACKBONE, ())).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    tokens = torch.randint(0, 97, (2, 3 * S))
    with torch.no_grad():
        base = torch.cat([plain(tokens[:, s * S:(s + 1) * S])[0].logits for s in range(3)], 1)
        full, _ = run_whole(model, tokens)
        off_model = ablated(model)
        off, _ = run_whole(off_model, tokens)
        again, _ = run_whole(model, tokens)
    mode = off_model.modes[0]
    assert torch.equal(again, full)                                     # the model itself is untouched
    effect = float((full - base).abs().max())
    if mode == "identity":
        assert_close(off, base)
    if effect > 1e-3:
        assert (off - full).abs().max() > 1e-3, f"{name}: the ablated model ({mode}) equals the full one"
    else:   # a memory without an effect here (a pure cache, nothing stored) must say it closes
        assert mode == "identity", (name, mode, effect)


@pytest.mark.parametrize("name,fields", CASES)
def test_state_survives_save_load(name, fields, tmp_path):
    model = make(name, fields).eval()
    tokens = torch.randint(0, 97, (2, 3 * S))
    kinds = model.memory.kinds
    with torch.no_grad():
        _, state = run_whole(model, tokens[:, :2 * S])
        save_state(state, tmp_path / "state", kinds)
        loaded = load_state(tmp_path / "state", kinds)
        a, st_a = model(tokens[:, 2 * S:], loaded)
        b, st_b = model(tokens[:, 2 * S:], state)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(st_a.pos, st_b.pos)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name,fields", CASES)
def test_spec_predicts_state_and_bounds_allocation(name, fields, grad):
    model = make(name, fields).train(grad)
    mem: Memory = model.memory.memories[0]
    spec = mem.spec(torch.float32)
    B = 3
    state = None
    with torch.set_grad_enabled(grad):
        for k in range(1, 5):
            _, state = model(torch.randint(0, 97, (B, S)), state)
            held = mem.held_bytes(state.memories[0])
            assert held == spec.state_bytes(k * S, B), (k, held, spec)
            assert allocated_nbytes(state.memories[0]) <= spec.max_bytes(k * S, B)
    assert model.memory.state_size(k * S) == spec.state_bytes(k * S) // spec.dtype_bytes


@pytest.mark.parametrize("name,fields", CASES)
def test_rows_independent_and_reset_isolates_a_row(name, fields):
    """Row 0 starts a new document at segment 2 while row 1 goes on; two segments after the reset
    are compared, so state that only shows once the first new segment is written is seen too."""
    model = make(name, fields).eval()
    a, b = torch.randint(0, 97, (1, 4 * S)), torch.randint(0, 97, (1, 4 * S))
    with torch.no_grad():
        both, _ = run_whole(model, torch.cat([a, b]), {2: torch.tensor([True, False])})
        alone_b, _ = run_whole(model, b)
        fresh_a, _ = run_whole(model, a[:, 2 * S:])
    assert_close(both[1:], alone_b)
    assert_close(both[:1, 2 * S:], fresh_a)


@pytest.mark.parametrize("name,fields", CASES)
def test_memory_parameters_get_gradient(name, fields):
    model = make(name, fields).train()
    params = dict(model.memory.named_parameters())
    if not params:
        pytest.skip(f"{name} has no parameters")
    tokens = torch.randint(0, 97, (2, 3 * S))
    # the training loss: LM loss plus the memories' auxiliary losses (a compressor may learn from
    # its own auxiliary loss only, as the Compressive Transformer's does)
    state, loss = None, 0.0
    for s in range(3):
        out, state = model(tokens[:, s * S:(s + 1) * S], state)
        loss = loss + cross_entropy(out.logits[:, :-1], tokens[:, s * S + 1:(s + 1) * S]) + out.aux_loss
    loss.backward()
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} got no gradient"


@pytest.mark.parametrize("name", MEMORIES.names())
def test_bad_config_lists_every_reason(name):
    cls = MEMORIES.config_class(name)
    with pytest.raises(ConfigError) as e:
        from_dict(cls, {"no_such_field": 1, "also_wrong": 2})
    assert len(e.value.reasons) == 2
    assert all("unknown field" in r for r in e.value.reasons)


@pytest.mark.parametrize("name", MEMORIES.names())
def test_declared_sites_have_hooks(name):
    cls = MEMORIES.target_class(name)
    hooks = {Site.EMBED: ("embed", "embed_out"), Site.ATTN: ("attn", "attn_out"), Site.BLOCK: ("block", "block_in"),
             Site.LOGITS: ("logits",)}
    for site in cls.sites:
        assert any(getattr(cls, h) is not getattr(Memory, h) for h in hooks[site]), f"{name} declares {site} but overrides no hook"
    for site, names in hooks.items():
        if site not in cls.sites:
            assert all(getattr(cls, h) is getattr(Memory, h) for h in names), f"{name} overrides {names} without declaring {site}"


@pytest.mark.parametrize("name,fields", CASES)
def test_reset_after_a_ragged_chunk_equals_a_fresh_run(name, fields):
    """A document that stops mid-segment (and mid-chunk, for memories that work in chunks), then
    every row is reset for a new document: the new document must not see anything of the old one
    -- partial-chunk buffers and pending writes included -- whole or decoded token by token."""
    model = make(name, fields).eval()
    old, new = torch.randint(0, 97, (2, S + 5)), torch.randint(0, 97, (2, 2 * S))
    every = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        fresh, _ = run_whole(model, new)
        _, state = model(old[:, :S], None, Step())
        _, state = model(old[:, S:], state, Step(seg_start=True, seg_end=False))      # 5 tokens, then the document ends
        got, _ = run_whole(model, new, {0: every}, state)
        dec = decoding_model(model)                  # the same, decoded: a prefill, then one token at a time
        st = dec.init_state(2)
        for chunk, step in ((old[:, :S], Step()), (old[:, S:S + 3], Step(seg_start=True, seg_end=False)),
                            (old[:, S + 3:S + 4], Step(seg_start=False, seg_end=False)),
                            (old[:, S + 4:S + 5], Step(seg_start=False, seg_end=False))):
            _, st = dec(chunk, st, step)
        outs = []
        for s in range(2):
            seg = new[:, s * S:(s + 1) * S]
            out, st = dec(seg[:, :7], st, Step(reset=every if s == 0 else None, seg_start=True, seg_end=False))
            outs.append(out.logits)
            for i in range(7, S):
                out, st = dec(seg[:, i:i + 1], st, Step(seg_start=False, seg_end=i == S - 1))
                outs.append(out.logits)
    assert_close(got, fresh)
    assert_close(torch.cat(outs, 1), fresh)
