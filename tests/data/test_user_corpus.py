"""The user's own data as a corpus (memstack/data/user.py) and a local Hugging Face tokenizer
directory (memstack/data/hf_tokenizer.py): every format read from tiny files made here, every
problem listed before anything trains."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from memstack.data.user import hash_split, read_corpus
from memstack.errors import ConfigError
from memstack.evals.lm import LMTask, LMTaskConfig, corpus_split

STORY = "The lighthouse keeper counted the ships that passed, one by one, until the fog came in. " * 30


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_file_is_one_document_split_by_position(tmp_path):
    f = write(tmp_path / "book.txt", STORY)
    c = read_corpus(str(f))
    assert c.format == "text" and len(c.docs) == 1 and c.docs[0][1] == STORY
    n = len(STORY)
    assert corpus_split(str(f), "train") == [STORY[:int(0.9 * n)]]
    assert corpus_split(str(f), "val") == [STORY[int(0.9 * n):int(0.95 * n)]]
    assert corpus_split(str(f), "test") == [STORY[int(0.95 * n):]]


def test_folder_of_text_files_one_document_each_hidden_and_other_files_skipped(tmp_path):
    for i in range(3):
        write(tmp_path / "d" / f"sub/{i}.txt", f"document {i} " * 10)
    write(tmp_path / "d" / "notes.md", "markdown text")
    write(tmp_path / "d" / "image.png", "not text")
    write(tmp_path / "d" / ".hidden" / "x.txt", "skipped")
    c = read_corpus(str(tmp_path / "d"))
    assert c.format == "folder" and [i for i, _ in c.docs] == ["notes.md", "sub/0.txt", "sub/1.txt", "sub/2.txt"]


def test_folder_with_train_val_test_subfolders_keeps_those_splits(tmp_path):
    for split, n in (("train", 3), ("validation", 1), ("test", 2)):
        for i in range(n):
            write(tmp_path / split / f"{i}.txt", f"{split} {i}")
    c = read_corpus(str(tmp_path))
    assert sorted(c.split("train")) == ["train 0", "train 1", "train 2"]
    assert c.split("val") == ["validation 0"] and sorted(c.split("test")) == ["test 0", "test 1"]


def test_many_documents_split_by_a_stable_hash_of_their_id(tmp_path):
    lines = [json.dumps({"text": f"document number {i}", "id": i}) for i in range(200)]
    f = write(tmp_path / "docs.jsonl", "\n".join(lines) + "\n\n")
    c = read_corpus(str(f))
    assert c.format == "jsonl" and len(c.docs) == 200
    parts = {s: c.split(s) for s in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 200 and all(parts.values())
    assert set(parts["train"]).isdisjoint(parts["test"]) and set(parts["val"]).isdisjoint(parts["test"])
    assert all(hash_split(f"docs.jsonl:{i + 1}") == s for s, texts in parts.items()
               for i in range(200) if f"document number {i}" in texts)
    # adding documents never moves an existing one to another split
    more = write(tmp_path / "more" / "docs.jsonl", "\n".join(lines + [json.dumps({"text": "new one"})]))
    assert set(parts["test"]) <= set(read_corpus(str(more)).split("test"))


def test_jsonl_problems_are_all_listed_with_line_numbers(tmp_path):
    f = write(tmp_path / "bad.jsonl", "\n".join([
        json.dumps({"text": "fine"}), "{not json", json.dumps(["a", "list"]), json.dumps({"body": "x"}),
        json.dumps({"text": 42})]))
    with pytest.raises(ConfigError) as e:
        read_corpus(str(f))
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for part in ("bad.jsonl:2: not valid JSON", "bad.jsonl:3: a JSON list", "bad.jsonl:4: no 'text' field (fields: body)",
                 "bad.jsonl:5: field 'text' is a int"):
        assert part in msg
    good = write(tmp_path / "body.jsonl", json.dumps({"body": "x y z"}))
    assert read_corpus(str(good), text_field="body").docs[0][1] == "x y z"


@pytest.mark.parametrize("content, reason", [
    (b"", "every document is empty"), (b"   \n\n  ", "every document is empty"),
    (b"\x00\x01\x02binary", "looks binary"), (b"caf\xe9 latin-1", "not UTF-8 text")])
def test_empty_binary_and_non_utf8_files_are_refused(tmp_path, content, reason):
    f = tmp_path / "x.txt"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=reason):
        read_corpus(str(f))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        read_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt, .md, .rst files|it is empty"):
        read_corpus(str(tmp_path / "empty"))


def test_lm_config_checks_the_path_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as e:
        LMTaskConfig(corpus=str(tmp_path / "missing.jsonl"), tokenizer="nope")
    assert "2 problem(s)" in str(e.value) and "no such file" in str(e.value) and "unknown tokenizer" in str(e.value)


def test_parquet_with_a_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"], "n": [1, 2]}), f)
    c = read_corpus(str(f))
    assert c.format == "parquet" and [t for _, t in c.docs] == ["alpha beta", "gamma"]
    with pytest.raises(ConfigError, match="column 'n' has type int64, expected strings"):
        read_corpus(str(f), text_field="n")
    with pytest.raises(ConfigError, match="no column 'body'"):
        read_corpus(str(f), text_field="body")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        read_corpus(str(bad))


def test_saved_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(5)]})
    ds.save_to_disk(str(tmp_path / "one"))
    c = read_corpus(str(tmp_path / "one"))
    assert c.format == "hf_dataset" and [t for _, t in c.docs] == [f"row {i}" for i in range(5)] and c.splits is None
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"content": [f"{s} {i}" for i in range(n)]})
                               for s, n in (("train", 3), ("validation", 1), ("test", 2))})
    dd.save_to_disk(str(tmp_path / "dict"))
    c = read_corpus(str(tmp_path / "dict"), text_field="content")
    assert c.split("train") == ["train 0", "train 1", "train 2"] and c.split("val") == ["validation 0"]
    assert c.split("test") == ["test 0", "test 1"]
    with pytest.raises(ConfigError) as e:
        read_corpus(str(tmp_path / "dict"))
    assert "3 problem(s)" in str(e.value) and "[train]: no column 'text' (columns: content)" in str(e.value)


def test_lm_task_trains_and_evaluates_on_a_user_folder(tmp_path):
    for i in range(3):
        write(tmp_path / "c" / f"{i}.txt", STORY)
    cfg = LMTaskConfig(corpus=str(tmp_path / "c"), tokenizer="byte", eval_tokens=500)
    task = LMTask(cfg, seg_len=32)
    assert sum(map(len, task.train_docs)) == 3 * int(0.9 * len(STORY))
    # a model that predicts uniformly over 257 byte ids: log2(257) bits per byte
    import torch

    from memstack.backbone.model import build_model
    from memstack.config import BackboneConfig, ModelConfig

    m = build_model(ModelConfig(BackboneConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, seg_len=32), ()))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    out = task.evaluate(m.eval(), "val")
    assert out["eval_tokens"] == 3 * (int(0.95 * len(STORY)) - int(0.9 * len(STORY)))
    assert out["bpb"] == pytest.approx(math.log2(257), rel=1e-5)
    assert len(task.data_sha256()) == 64


# ------------------------------------------------------------------------------------ tokenizer directory

@pytest.fixture
def tok_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([STORY], trainer)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_local_tokenizer_directory(tok_dir):
    from memstack.data.tokenizers import get_tokenizer
    from memstack.evals.task import tokenizer_vocab

    t = get_tokenizer(str(tok_dir))
    assert t.vocab_size == tokenizer_vocab(str(tok_dir)) <= 300 and t.eot_id == 0
    text = "The keeper counted ships, café."
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert int(t.token_bytes()[ids].sum()) == len(text.encode("utf-8"))   # bytes per id add up exactly
    assert t.token_bytes()[t.eot_id] == 0 and len(t.fingerprint()) == 16
    cfg = LMTaskConfig(tokenizer=str(tok_dir))
    assert cfg.vocab_size() == t.vocab_size


def test_tokenizer_directory_problems(tmp_path, tok_dir):
    from memstack.data.hf_tokenizer import HFTokenizerDir

    with pytest.raises(ConfigError, match="no tokenizer.json"):
        LMTaskConfig(tokenizer=str(tmp_path))
    doc = json.loads((tok_dir / "tokenizer.json").read_text())
    doc["added_tokens"] = []
    doc["model"]["vocab"].pop("<|endoftext|>")
    (tok_dir / "tokenizer.json").write_text(json.dumps(doc))
    pytest.importorskip("tokenizers")
    with pytest.raises(ConfigError, match="no end-of-text token"):
        HFTokenizerDir(str(tok_dir))
    # eos_token from tokenizer_config.json
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "Ġthe"}))
    t = HFTokenizerDir(str(tok_dir))
    assert t.eot_id == doc["model"]["vocab"]["Ġthe"]
    assert np.all(t.token_bytes() >= 0)
