"""Evaluation tasks: bits per byte, accuracy / exact match, segment-by-segment prediction, configs.

Fake models (no training) make every metric computable by hand: a model with uniform logits
has bpb = log2(257) on bytes; a model that always predicts token c is right exactly where the
label is c; a lookup-table model is right exactly where table[input] == label.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, from_dict
from memstack.data.packing import IGNORE
from memstack.data.tokenizer_base import ByteTokenizer
from memstack.errors import ConfigError, UnknownNameError
from memstack.evals.lm import LMTask, LMTaskConfig, corpus_split
from memstack.evals.mqar import MQARTask, MQARTaskConfig
from memstack.evals.passkey import PasskeyTask, PasskeyTaskConfig
from memstack.evals.segment_ar import SegmentARTask, SegmentARTaskConfig
from memstack.evals.task import TaskConfig, accuracy_metrics, build_task, example_predictions, tokenizer_vocab
from memstack.memory.learned.config import XLConfig

LOG2_257, LN_257 = math.log2(257), math.log(257)


# ------------------------------------------------------------------------------------ fake models

class FakeModel(nn.Module):
    """Implements what the tasks use of a model (device, init_state, forward -> logits) and
    records every call: the chunk length and whether the call reset the row."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.calls: list[tuple[int, int, list[bool]]] = []   # (batch, chunk len, reset per row)
        self._p = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self._p.device

    def init_state(self, batch: int, device=None):
        return SimpleNamespace(batch=batch)

    def logits_for(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens, state, step):
        assert state.batch == tokens.shape[0]
        reset = step.reset.tolist() if step is not None and step.reset is not None else [False] * tokens.shape[0]
        self.calls.append((tokens.shape[0], tokens.shape[1], reset))
        return SimpleNamespace(logits=self.logits_for(tokens)), state


class ConstModel(FakeModel):
    """Always predicts token c."""

    def __init__(self, vocab: int, c: int):
        super().__init__(vocab)
        self.c = c

    def logits_for(self, tokens):
        out = torch.zeros(*tokens.shape, self.vocab)
        out[..., self.c] = 1.0
        return out


class LookupModel(FakeModel):
    """Predicts table[input token] (a per-position function of the input; no context)."""

    def __init__(self, table: np.ndarray):
        super().__init__(len(table))
        self.table = torch.as_tensor(table)

    def logits_for(self, tokens):
        return torch.nn.functional.one_hot(self.table[tokens], self.vocab).float()


class FixedDistModel(FakeModel):
    """The same next-token log-probabilities at every position."""

    def __init__(self, logp: torch.Tensor):
        super().__init__(len(logp))
        self.logp = logp.float()

    def logits_for(self, tokens):
        return self.logp.expand(*tokens.shape, self.vocab).clone()


def tiny_backbone(vocab: int, seg_len: int, **kw) -> BackboneConfig:
    return BackboneConfig(**{"vocab_size": vocab, "d_model": 32, "n_layers": 2, "n_heads": 2, "seg_len": seg_len, **kw})


def byte_docs(split: str, cap: int | None) -> list[np.ndarray]:
    """The test split tokenized with bytes, independently of LMTask, capped at `cap` tokens."""
    out, n = [], 0
    for text in corpus_split("sotu", split):
        d = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if cap is not None:
            if n >= cap:
                break
            d = d[: cap - n]
        if len(d):
            out.append(d)
        n += len(d)
    return out


# ------------------------------------------------------------------------------------ LM: bits per byte

@pytest.mark.parametrize("eval_rows,seg_len", [(1, 16), (3, 64)])
def test_lm_uniform_logits_give_log2_257_bits_per_byte(eval_rows, seg_len):
    """A real model whose head is zeroed predicts uniformly over 257 ids: every byte costs log2(257)."""
    model = build_model(tiny_backbone(257, seg_len, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    task = LMTask(LMTaskConfig(tokenizer="byte", eval_tokens=700, eval_rows=eval_rows), seg_len)
    m = task.evaluate(model)
    assert m["eval_tokens"] == 700 and m["eval_bytes"] == 700            # byte tokenizer: 1 byte per token
    # float32 per-token losses, float64 accumulation: agreement to float32 precision
    assert m["bpb"] == pytest.approx(LOG2_257 * m["eval_tokens"] / m["eval_bytes"], rel=1e-6)
    assert m["bpb"] == pytest.approx(LOG2_257, rel=1e-6)
    assert m["loss"] == pytest.approx(LN_257, rel=1e-6)
    assert m["ppl"] == pytest.approx(257.0, rel=1e-5)


@pytest.mark.parametrize("eval_tokens", [1, 63, 9191, 12000])
def test_lm_eval_tokens_caps_exactly_and_every_token_is_predicted_once(eval_tokens):
    """With a fixed distribution p, nll = sum over the predicted tokens of -ln p[token]: equal to
    the sum over the (independently tokenized, capped) documents iff every token is predicted
    exactly once and nothing else (no <eot>, no padding) is. 9191 = the first test document
    exactly; 12000 crosses into the second."""
    gen = torch.Generator().manual_seed(eval_tokens)
    logp = torch.log_softmax(torch.randn(257, generator=gen, dtype=torch.float64) * 3, -1)
    model = FixedDistModel(logp)
    task = LMTask(LMTaskConfig(tokenizer="byte", eval_tokens=eval_tokens, eval_rows=3), 64)
    m = task.evaluate(model)
    docs = byte_docs("test", eval_tokens)
    n = sum(len(d) for d in docs)
    assert n == eval_tokens
    assert m["eval_tokens"] == eval_tokens and m["eval_bytes"] == eval_tokens
    want_nll = float(sum(-logp[torch.from_numpy(d)].sum() for d in docs))
    assert m["loss"] == pytest.approx(want_nll / n, rel=1e-5)
    assert m["bpb"] == pytest.approx(want_nll / math.log(2) / n, rel=1e-5)
    # every call is one whole segment for every row; the rows start fresh
    assert all(T == 64 and B == 3 for B, T, _ in model.calls)
    assert model.calls[0][2] == [True, True, True]


def test_lm_eval_docs_are_the_capped_test_split():
    task = LMTask(LMTaskConfig(tokenizer="byte", eval_tokens=12000), 64)
    want = byte_docs("test", 12000)
    assert [len(d) for d in task.eval_docs] == [len(d) for d in want] == [9191, 12000 - 9191]
    for a, b in zip(task.eval_docs, want):
        np.testing.assert_array_equal(a, b)


def test_lm_eval_split_val_differs_from_test():
    t_val = LMTask(LMTaskConfig(tokenizer="byte", eval_split="val", eval_tokens=100), 64)
    t_test = LMTask(LMTaskConfig(tokenizer="byte", eval_split="test", eval_tokens=100), 64)
    np.testing.assert_array_equal(t_val.eval_docs[0], byte_docs("val", 100)[0])
    assert not np.array_equal(t_val.eval_docs[0], t_test.eval_docs[0])


def test_lm_bpb_counts_bytes_of_multibyte_tokens():
    """bpb divides by UTF-8 bytes, not tokens: with bpe512 (several bytes per token) a uniform
    model has bpb = log2(512) * n_tokens / n_bytes, and n_bytes is the bytes of the text."""
    model = FixedDistModel(torch.full((512,), -math.log(512), dtype=torch.float64))
    task = LMTask(LMTaskConfig(tokenizer="bpe512", eval_tokens=500, eval_rows=2), 32)
    m = task.evaluate(model)
    tok = task.tokenizer
    want_bytes = sum(int(tok.token_bytes()[d].sum()) for d in task.eval_docs)
    assert m["eval_tokens"] == 500
    assert m["eval_bytes"] == want_bytes == len(tok.decode(task.eval_docs[0].tolist()).encode("utf-8"))
    assert m["eval_bytes"] > m["eval_tokens"]
    assert m["bpb"] == pytest.approx(math.log2(512) * 500 / want_bytes, rel=1e-6)


def test_lm_evaluate_is_independent_of_eval_rows_and_seg_len_for_a_context_free_model():
    logp = torch.log_softmax(torch.randn(257, dtype=torch.float64), -1)
    got = [LMTask(LMTaskConfig(tokenizer="byte", eval_tokens=3000, eval_rows=r), s).evaluate(FixedDistModel(logp))
           for r, s in [(1, 8), (4, 64), (8, 100)]]
    for g in got[1:]:
        assert g["eval_tokens"] == got[0]["eval_tokens"] == 3000
        assert g["bpb"] == pytest.approx(got[0]["bpb"], rel=1e-6)


def test_lm_documents_start_from_a_fresh_state():
    """Each document is evaluated from a fresh memory state: with Transformer-XL, one row reading
    the documents one after another gives the same bpb as three rows reading them side by side
    (no state leaks from one document into the next)."""
    model = build_model(tiny_backbone(257, 32, init_std=0.5), [XLConfig(mem_len=64)]).eval()
    cfg = dict(tokenizer="byte", eval_tokens=10000)      # two documents (9191 + 809 tokens)
    one = LMTask(LMTaskConfig(eval_rows=1, **cfg), 32).evaluate(model)
    three = LMTask(LMTaskConfig(eval_rows=3, **cfg), 32).evaluate(model)
    assert one["eval_tokens"] == three["eval_tokens"] == 10000
    # batching changes the sums by ~1e-9; a leak of 64 tokens of state changes bpb by ~3e-4
    assert one["bpb"] == pytest.approx(three["bpb"], rel=1e-7)
    # the test has power: the memory changes the predictions (same weights without XL differ)
    plain = build_model(model.cfg.backbone).eval()
    plain.load_state_dict(model.state_dict())
    no_mem = LMTask(LMTaskConfig(eval_rows=3, **cfg), 32).evaluate(plain)
    assert abs(no_mem["bpb"] - three["bpb"]) > 1e-4


# ------------------------------------------------------------------------------------ accuracy tasks

def most_common_label(labels: np.ndarray) -> tuple[int, float, float]:
    """(c, fraction of labels equal to c, fraction of examples whose labels are all c)."""
    mask = labels != IGNORE
    vals, counts = np.unique(labels[mask], return_counts=True)
    c = int(vals[counts.argmax()])
    acc = float(((labels == c) & mask).sum() / mask.sum())
    exact = float(((labels == c) | ~mask).all(axis=1).mean())
    return c, acc, exact


def test_mqar_constant_model_accuracy_is_label_frequency():
    cfg = MQARTaskConfig(vocab=128, seq_len=64, num_kv_pairs=4, n_train=8, n_test=60)
    task = build_task(cfg, seg_len=16)                        # 4 segments per example
    assert isinstance(task, MQARTask)
    labels = task.test.labels
    for c in (most_common_label(labels)[0], 0):
        model = ConstModel(128, c)
        m = task.evaluate(model)
        mask = labels != IGNORE
        assert m["acc"] == pytest.approx(((labels == c) & mask).sum() / mask.sum())
        assert m["exact"] == pytest.approx(((labels == c) | ~mask).all(axis=1).mean())
        # every example is processed as 4 consecutive segments of 16, reset at the first
        assert [T for _, T, _ in model.calls] == [16] * (4 * 2)     # 60 examples = batches of 32 + 28
        assert all(all(r) == (i % 4 == 0) for i, (_, _, r) in enumerate(model.calls))
    assert most_common_label(labels)[1] > 0                  # the check above is not vacuous
    assert task.evaluate(ConstModel(128, 0))["acc"] == 0.0   # values are never 0 in MQAR


def test_segment_ar_constant_model_accuracy_is_label_frequency():
    cfg = SegmentARTaskConfig(vocab=64, num_pairs=3, n_train=8, n_test=80)
    task = build_task(cfg, seg_len=8)
    assert isinstance(task, SegmentARTask)
    labels = task.test.labels
    assert labels.shape == (80, 4 * 8)
    c, acc, exact = most_common_label(labels)
    m = task.evaluate(ConstModel(64, c))
    assert acc > 0
    assert m["acc"] == pytest.approx(acc)
    assert m["exact"] == pytest.approx(exact)
    assert task.evaluate(ConstModel(64, 0))["acc"] == 0.0


def test_lookup_model_accuracy_matches_table():
    """A per-position predictor's token accuracy/exact match computed by hand (MQAR)."""
    cfg = MQARTaskConfig(vocab=128, seq_len=64, num_kv_pairs=4, n_train=8, n_test=40)
    task = MQARTask(cfg, seg_len=24)                          # 64 = 24 + 24 + 16 (padded last segment)
    inputs, labels = task.test.inputs, task.test.labels
    table = np.random.default_rng(0).integers(0, 128, size=128)
    # make the table right for half of the keys: key -> the value it is bound to in example 0
    keys, vals = inputs[0, 0:8:2], inputs[0, 1:8:2]
    table[keys[:2]] = vals[:2]
    m = task.evaluate(LookupModel(table))
    mask = labels != IGNORE
    correct = (table[inputs] == labels) & mask
    assert correct.sum() > 0
    assert m["acc"] == pytest.approx(correct.sum() / mask.sum())
    assert m["exact"] == pytest.approx((correct | ~mask).all(axis=1).mean())


def test_accuracy_metrics_by_hand():
    correct = np.array([[True, False, False], [False, False, True], [False, False, False]])
    mask = np.array([[True, True, False], [False, False, True], [False, False, False]])
    m = accuracy_metrics(correct & mask, mask)
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["exact"] == pytest.approx(2 / 3)               # row 1 all right, row 2 has no labels
    assert math.isnan(accuracy_metrics(np.zeros((0, 3), bool), np.zeros((0, 3), bool))["exact"])


# ------------------------------------------------------------------------------------ example_predictions

@pytest.mark.parametrize("kind", ["none", "xl"])
def test_example_predictions_equal_running_the_model_segment_by_segment(kind):
    """Examples longer than seg_len are cut into segments with the state carried; batches of
    examples give the same predictions as running the model on each example alone."""
    S, L, E = 8, 29, 7                                       # 29 = 3 * 8 + 5: a partial last segment
    mems = [XLConfig(mem_len=12)] if kind == "xl" else []
    model = build_model(tiny_backbone(50, S, init_std=0.3), mems).double().eval()
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 50, size=(E, L))
    labels = rng.integers(0, 50, size=(E, L))
    labels[rng.random((E, L)) < 0.4] = IGNORE
    correct, mask = example_predictions(model, inputs, labels, S, batch_size=3)
    assert correct.shape == mask.shape == (E, L)
    np.testing.assert_array_equal(mask, labels != IGNORE)
    preds = np.zeros((E, L), dtype=np.int64)
    with torch.no_grad():
        for e in range(E):
            state = model.init_state(1)
            for s in range(0, L, S):
                out, state = model(torch.as_tensor(inputs[e:e + 1, s:s + S]), state)
                preds[e, s:s + S] = out.logits[0].argmax(-1).numpy()
    np.testing.assert_array_equal(correct, (preds == labels) & mask)
    # the test has power: with labels = the reference predictions, everything labelled is right
    correct2, _ = example_predictions(model, inputs, np.where(mask, preds, IGNORE), S, batch_size=3)
    np.testing.assert_array_equal(correct2, mask)
    if kind == "xl":  # memory matters: without the carried state the later segments differ
        alone = np.concatenate([model(torch.as_tensor(inputs[:, s:s + S]))[0].logits.argmax(-1).numpy()
                                for s in range(0, L, S)], axis=1)
        assert (alone[:, S:] != preds[:, S:]).any()


# ------------------------------------------------------------------------------------ passkey

@pytest.fixture(scope="module")
def passkey_task() -> PasskeyTask:
    cfg = PasskeyTaskConfig(tokenizer="byte", train_len=300, lengths=(300, 420), depths=(0.0, 0.5, 1.0),
                            per_cell=12, n_train=4, n_digits=1)
    return PasskeyTask(cfg, seg_len=64)


def test_passkey_metric_keys_and_values(passkey_task):
    """A lookup model that answers ' 7' after 's' (the end of the question) is exactly right on
    the examples whose key is 7: exact@L/d = fraction of keys 7 in that cell."""
    tok = ByteTokenizer()
    table = np.arange(257)
    table[ord("s")] = ord(" ")
    table[ord(" ")] = ord("7")
    m = passkey_task.evaluate(LookupModel(table))
    want_keys = {"exact@300/0", "exact@300/0.5", "exact@300/1", "exact@420/0", "exact@420/0.5", "exact@420/1",
                 "exact@300", "exact@420", "exact"}
    assert set(m) == want_keys
    assert tok.encode(" 7") == [ord(" "), ord("7")]
    cells = {(c.length, c.depth): c for c in passkey_task.grid}
    assert len(cells) == 6
    for (L, d), cell in cells.items():
        assert cell.batch.inputs.shape == (12, L)
        assert m[f"exact@{L}/{d:g}"] == pytest.approx(float(np.mean(cell.batch.meta["keys"] == 7)))
    assert any(m[f"exact@{L}/{d:g}"] > 0 for L, d in cells)
    for L in (300, 420):
        assert m[f"exact@{L}"] == pytest.approx(np.mean([m[f"exact@{L}/{d:g}"] for d in (0.0, 0.5, 1.0)]))
    assert m["exact"] == pytest.approx(np.mean([m[k] for k in want_keys if "/" in k]))
    assert PasskeyTask.primary == "exact" and PasskeyTask.higher_is_better


def test_passkey_real_model_runs_in_segments(passkey_task):
    model = build_model(tiny_backbone(257, 64), [XLConfig(mem_len=64)]).eval()
    m = passkey_task.evaluate(model)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert len(m) == 9


# ------------------------------------------------------------------------------------ configs

def reasons_of(exc: pytest.ExceptionInfo) -> list[str]:
    assert isinstance(exc.value, ConfigError)
    return exc.value.reasons


def test_lm_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        LMTaskConfig(eval_tokens=0, eval_rows=0)
    r = reasons_of(e)
    assert len(r) == 2
    assert any("eval_tokens" in x and "0" in x for x in r) and any("eval_rows" in x for x in r)
    LMTaskConfig(eval_tokens=None)                           # null = the whole split


def test_lm_config_rejects_unknown_tokenizer_at_construction():
    """An unknown tokenizer must be a config error (listed with the other reasons), not an
    error raised later when the vocabulary is first needed."""
    with pytest.raises(ConfigError) as e:
        LMTaskConfig(tokenizer="nosuch", eval_rows=0)
    r = " ".join(reasons_of(e))
    assert "nosuch" in r and "byte" in r and "eval_rows" in r


def test_lm_config_rejects_bpe_vocab_out_of_range():
    """tokenizer_vocab('bpe12') answers 12 although get_tokenizer refuses bpe12 (min 258)."""
    with pytest.raises((ConfigError, UnknownNameError)):
        tokenizer_vocab("bpe12")
    with pytest.raises(ConfigError):
        LMTaskConfig(tokenizer="bpe12")


def test_lm_config_from_dict_rejects_unknown_corpus():
    with pytest.raises(ConfigError) as e:
        from_dict(TaskConfig, {"kind": "lm", "corpus": "wikitext", "eval_splitt": "val"})
    r = " ".join(reasons_of(e))
    assert "wikitext" in r and "sotu" in r and "eval_splitt" in r and "eval_split" in r


def test_mqar_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        MQARTaskConfig(vocab=32, seq_len=63, num_kv_pairs=4, n_test=0)
    r = reasons_of(e)
    text = " ".join(r)
    assert "even" in text and "vocab_size must be > input_seq_len" in text and "n_test" in text
    assert len(r) >= 3


def test_segment_ar_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        SegmentARTaskConfig(vocab=10, num_pairs=0)
    r = reasons_of(e)
    assert len(r) == 2 and "vocab must be >= 34" in r[0] and "num_pairs" in r[1]


def test_segment_ar_config_rejects_empty_splits():
    """MQAR rejects n_train/n_test < 1 at construction; segment_ar must too (otherwise the error
    appears only when the test set is built, after training)."""
    with pytest.raises(ConfigError) as e:
        SegmentARTaskConfig(n_train=0, n_test=0)
    assert any("n_test" in x for x in reasons_of(e))


def test_passkey_config_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        PasskeyTaskConfig(lengths=(), depths=(1.5,), per_cell=0, n_train=0, train_len=0)
    r = reasons_of(e)
    assert len(r) == 5
    for word in ("lengths", "depths", "per_cell", "n_train", "train_len"):
        assert any(x.startswith(word) for x in r), word
    with pytest.raises(ConfigError):
        PasskeyTaskConfig(depths=())


def test_passkey_config_rejects_bad_n_digits():
    """n_digits outside [1, 18] is only caught when the data is generated (after training)."""
    with pytest.raises(ConfigError) as e:
        PasskeyTaskConfig(n_digits=0)
    assert any("n_digits" in x for x in reasons_of(e))


def test_task_from_dict_unknown_kind_lists_tasks():
    with pytest.raises(ConfigError) as e:
        from_dict(TaskConfig, {"kind": "nosuch"})
    text = str(e.value)
    for name in ("lm", "mqar", "passkey", "segment_ar"):
        assert name in text


def test_task_vocab_and_context():
    assert LMTaskConfig(tokenizer="byte").vocab_size() == 257
    assert MQARTaskConfig(vocab=256, seq_len=128).vocab_size() == 256
    assert MQARTaskConfig(seq_len=128).context_tokens() == 128
    assert PasskeyTaskConfig(tokenizer="byte", lengths=(300, 900)).context_tokens() == 900
    assert PasskeyTaskConfig(tokenizer="gpt2").vocab_size() == 50257
    assert SegmentARTaskConfig(vocab=40).vocab_size() == 40


# ------------------------------------------------------------------------------------ tokenizer_vocab

def test_tokenizer_vocab():
    assert tokenizer_vocab("byte") == 257
    assert tokenizer_vocab("gpt2") == 50257
    assert tokenizer_vocab("bpe512") == 512
    from memstack.data.tokenizers import get_tokenizer

    for name in ("byte", "bpe512"):
        assert get_tokenizer(name).vocab_size == tokenizer_vocab(name)


def test_tokenizer_vocab_unknown_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        tokenizer_vocab("nosuch")
    assert "byte" in str(e.value) and "gpt2" in str(e.value)
