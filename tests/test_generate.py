"""Generation: sampling rules, greedy decoding against a full segment-wise forward, the Decoder.

The reference for decoding is the model as it trains: a sequence is processed in whole segments
of seg_len with the state carried, the last segment partial; the next token is the argmax of
the last position's logits.
"""
from __future__ import annotations

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig
from memstack.errors import ConfigError
from memstack.generate import Decoder, SamplingConfig, decoding_model, generate, sample
from memstack.memory.baseline import NoMemoryConfig
from memstack.memory.kv.config import DenseKVConfig, PagedKVConfig, TrellisConfig
from memstack.memory.learned.config import (ARMTConfig, CompressiveConfig, HMTConfig, InfiniConfig, LatentConfig, LM2Config,
                                            MemoryTokensConfig, PrefixConfig, RMTConfig, XLConfig)
from memstack.memory.retrieval.config import KNNLMConfig, MemorizingConfig, RetroConfig
from memstack.registry import MEMORIES
from tolerances import assert_close

SEG = 8
V = 64

MEMORY_CONFIGS = {
    "none": [NoMemoryConfig()],
    "xl": [XLConfig(mem_len=12)],
    "memory_tokens": [MemoryTokensConfig(n_tokens=3)],
    "kv_dense": [DenseKVConfig(scope="document")],
    "kv_dense_window": [DenseKVConfig(scope="document", window=5)],
    "kv_paged": [PagedKVConfig(scope="document", block_size=4)],
    "rmt": [RMTConfig(n_tokens=2)],
    "armt": [ARMTConfig(n_tokens=2, d_mem=4, nu=2)],
    "infini": [InfiniConfig(rule="delta", gate_init=0.0)],
    "hmt": [HMTConfig(n_sensory=2, n_summary=3, cache_size=2)],
    # learned memory state, part B (compressed slots are written at segment ends, mid-segment reads
    # must see the compressed memory as it was when the segment started)
    "compressive": [CompressiveConfig(mem_len=8, cmem_len=4, rate=2, compression="conv")],
    "lm2": [LM2Config(n_slots=4, n_heads=2)],
    "latents": [LatentConfig(n_latents=3, n_heads=2)],
    "prefix": [PrefixConfig(n_prefix=3, init_std=0.3)],
    # gate_init 0.5: a memory that is switched on, so decoding in pieces must read what was written
    "trellis": [TrellisConfig(slots=4, window=5, write_chunk=3, gate_init=0.5)],
    # retrieval (corpus stores are files: these use the document-scoped variants)
    "knn_lm": [KNNLMConfig(cache_len=12, k=3, lmbda=0.3, temperature=2.0)],
    "memorizing": [MemorizingConfig(mem_len=12, k=3)],
    "retro": [RetroConfig(chunk=4, k=1, db_len=4, key_dim=8)],
}
# every other registered memory with its first contract configuration that fits this backbone
# (segments of SEG tokens), so generation is checked for each memory whoever registered it
for _name in MEMORIES.names():
    if _name not in MEMORY_CONFIGS:
        for _fields in MEMORIES.target_class(_name).contract_configs():
            _cfg = MEMORIES.config_class(_name)(**_fields)
            if not _cfg.check_with(BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, seg_len=SEG)):
                MEMORY_CONFIGS[_name] = [_cfg]
                break


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    # init_std 0.3: a random model with decisive, varied predictions (no near-ties in argmax)
    b = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, seg_len=SEG, init_std=0.3)
    return build_model(b, MEMORY_CONFIGS[kind]).eval()


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after the last token of ids (B, T): whole segments, state carried."""
    state = model.init_state(ids.shape[0])
    for s in range(0, ids.shape[1], SEG):
        out, state = model(ids[:, s:s + SEG], state)
    return out.logits[:, -1]


@torch.no_grad()
def reference_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    ids = prompt
    for _ in range(n):
        ids = torch.cat([ids, reference_logits(model, ids).argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:]


# ------------------------------------------------------------------------------------ sample

def test_greedy_is_argmax():
    logits = torch.randn(16, 100)
    assert torch.equal(sample(logits, SamplingConfig()), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(temperature=0.0, top_k=5, top_p=0.3)), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 7.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
    logits = torch.randn(64, 100)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample(logits, SamplingConfig(temperature=temperature, top_k=1), g), logits.argmax(-1))


def test_top_k_never_samples_outside_the_k_largest():
    logits = torch.randn(1, 50).expand(4000, 50)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    g = torch.Generator().manual_seed(1)
    got = sample(logits, SamplingConfig(temperature=5.0, top_k=3), g)
    assert set(got.tolist()) == top3


def test_top_p_keeps_the_smallest_nucleus():
    """p = (0.4, 0.3, 0.2, 0.1) in a shuffled order over 8 ids (4 with p = 0): top_p = 0.5 keeps the
    two most likely ids (0.4 < 0.5 <= 0.7), sampled 4:3."""
    probs = torch.tensor([0.0, 0.2, 0.0, 0.4, 0.1, 0.0, 0.3, 0.0])
    logits = torch.log(probs).expand(20000, 8).contiguous()
    g = torch.Generator().manual_seed(2)
    got = sample(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)
    counts = torch.bincount(got, minlength=8)
    assert set(torch.nonzero(counts).flatten().tolist()) == {3, 6}
    assert counts[3] / counts.sum() == pytest.approx(0.4 / 0.7, abs=0.02)
    # top_p = 0.75 needs the third id too; top_p = 0.3 only the first
    got = sample(logits, SamplingConfig(temperature=1.0, top_p=0.75), g)
    assert set(got.tolist()) == {3, 6, 1}
    got = sample(logits, SamplingConfig(temperature=1.0, top_p=0.3), g)
    assert set(got.tolist()) == {3}


def test_top_p_per_row():
    """Each row gets its own nucleus."""
    a = torch.log(torch.tensor([0.05, 0.05, 0.9]))
    b = torch.log(torch.tensor([0.5, 0.45, 0.05]))
    logits = torch.stack([a, b] * 3000)
    g = torch.Generator().manual_seed(3)
    got = sample(logits, SamplingConfig(temperature=1.0, top_p=0.8), g)
    assert set(got[0::2].tolist()) == {2}
    assert set(got[1::2].tolist()) == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = torch.log(probs).expand(40000, 4)
    g = torch.Generator().manual_seed(4)
    got = sample(logits, SamplingConfig(temperature=1.0), g)
    freq = torch.bincount(got, minlength=4).float() / len(got)
    assert torch.allclose(freq, probs, atol=0.015)
    # temperature 0.5 squares the probabilities (renormalised)
    got = sample(logits, SamplingConfig(temperature=0.5), g)
    freq = torch.bincount(got, minlength=4).float() / len(got)
    assert torch.allclose(freq, probs**2 / (probs**2).sum(), atol=0.015)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 300)
    cfg = SamplingConfig(temperature=1.3, top_k=50, top_p=0.9)
    draws = lambda seed: torch.stack([sample(logits, cfg, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(10)])  # noqa: E731
    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))


def test_sampling_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        SamplingConfig(max_new_tokens=-1, temperature=-0.5, top_k=-2, top_p=0.0)
    r = e.value.reasons
    assert len(r) == 4
    for word in ("max_new_tokens", "temperature", "top_k", "top_p"):
        assert any(x.startswith(word) for x in r), word
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=1.5)
    SamplingConfig(max_new_tokens=0, top_p=1.0, top_k=0, temperature=0.0)


# ------------------------------------------------------------------------------------ generate

@pytest.mark.parametrize("kind", ["none", "xl"])
@pytest.mark.parametrize("prompt_len", [3, 13])
def test_greedy_generation_equals_full_forward(kind, prompt_len):
    """20 new tokens after a 3- or 13-token prompt cross 3 segment boundaries of 8."""
    model = tiny_model(kind)
    prompt = torch.randint(0, V, (1, prompt_len))
    got = torch.stack(list(generate(model, prompt, SamplingConfig(max_new_tokens=20))), 1)
    want = reference_greedy(model, prompt, 20)
    assert got.shape == (1, 20)
    assert torch.equal(got, want)
    assert len(set(want[0].tolist())) > 3               # a non-degenerate continuation


@pytest.mark.parametrize("kind", [k for k in MEMORY_CONFIGS if k not in ("none", "xl")])
def test_greedy_generation_equals_full_forward_other_memories(kind):
    model = tiny_model(kind)
    prompt = torch.randint(0, V, (1, 5))
    got = torch.stack(list(generate(model, prompt, SamplingConfig(max_new_tokens=19))), 1)
    assert torch.equal(got, reference_greedy(model, prompt, 19))


def test_generation_batch_equals_each_row_alone():
    model = tiny_model("xl")
    prompts = torch.randint(0, V, (3, 6))
    cfg = SamplingConfig(max_new_tokens=12)
    both = torch.stack(list(generate(model, prompts, cfg)), 1)
    for i in range(3):
        alone = torch.stack(list(generate(model, prompts[i].tolist(), cfg)), 1)
        assert torch.equal(both[i:i + 1], alone)


def test_generate_accepts_a_list_and_restores_training_mode():
    model = tiny_model("none").train()
    prompt = torch.randint(0, V, (7,)).tolist()
    got = [int(t) for t in generate(model, prompt, SamplingConfig(max_new_tokens=4))]
    assert model.training
    model.eval()
    assert got == reference_greedy(model, torch.tensor([prompt]), 4)[0].tolist()


def test_stop_ids_stop_generation():
    model = tiny_model("xl")
    prompt = torch.randint(0, V, (1, 4))
    full = [int(t) for t in generate(model, prompt, SamplingConfig(max_new_tokens=20))]
    k = next(i for i in range(3, 20) if full[i] not in full[:i])   # first occurrence of that token
    got = [int(t) for t in generate(model, prompt, SamplingConfig(max_new_tokens=20, stop_ids=(full[k],)))]
    assert got == full[:k + 1]                              # the stop token is yielded, then it ends


def test_stop_waits_for_every_row():
    model = tiny_model("none")
    prompts = torch.randint(0, V, (2, 4))
    cfg = SamplingConfig(max_new_tokens=15)
    full = torch.stack(list(generate(model, prompts, cfg)), 1)
    stop = int(full[0, 2])
    got = torch.stack(list(generate(model, prompts, SamplingConfig(max_new_tokens=15, stop_ids=(stop,)))), 1)
    hit = [next((i for i, t in enumerate(row.tolist()) if t == stop), 14) for row in full]
    assert got.shape[1] == max(hit) + 1
    assert torch.equal(got, full[:, :got.shape[1]])


def test_max_new_tokens_zero_yields_nothing():
    assert list(generate(tiny_model("none"), [1, 2, 3], SamplingConfig(max_new_tokens=0))) == []


def test_sampled_generation_is_reproducible_with_the_seed():
    model = tiny_model("xl")
    prompt = torch.randint(0, V, (2, 5))
    run = lambda seed: torch.stack(list(generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=seed))), 1)  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# ------------------------------------------------------------------------------------ Decoder

@pytest.mark.parametrize("kind", list(MEMORY_CONFIGS))
def test_decoder_feed_across_segment_boundaries(kind):
    """Feeding in uneven pieces (some crossing one or two boundaries) gives, after every piece,
    the logits of a full forward of everything fed so far. In float64, so that the comparison is
    of the decoding logic, not of fp32 summation order compounded through recurrent memories."""
    model = tiny_model(kind).double()
    ids = torch.randint(0, V, (2, 40))
    dec = Decoder(model, batch=2)
    fed = 0
    for n in (3, 7, 1, 5, 8, 1, 13, 2):                    # 40 tokens
        logits = dec.feed(ids[:, fed:fed + n])
        fed += n
        assert dec.in_seg == fed % SEG
        assert_close(logits, reference_logits(model, ids[:, :fed]))


def test_every_registered_memory_is_covered():
    assert set(MEMORIES.names()) <= set(MEMORY_CONFIGS)


def test_decoder_feed_needs_tokens():
    dec = Decoder(tiny_model("none"))
    with pytest.raises(ValueError):
        dec.feed(torch.zeros(1, 0, dtype=torch.long))


def test_decoding_model_adds_a_segment_cache_only_when_needed():
    plain = tiny_model("none")
    dm = decoding_model(plain)
    assert dm.memory.kinds == ["none", "kv_dense"]
    assert dm.memory.configs[-1].scope == "segment"
    assert dm.lm_head.weight is plain.lm_head.weight      # shares the parameters
    kv = tiny_model("kv_dense")
    assert decoding_model(kv) is kv
