"""`memstack memory ...` end to end on a tiny Engram checkpoint: stats, snapshot, learn (only
table rows change, the version is committed), log, export / import into a replica store,
rollback, apply; bad input exits non-zero with the reason."""
from __future__ import annotations

import json

import torch

from memstack.backbone.model import build_model
from memstack.checkpoint import load_checkpoint, save_checkpoint
from memstack.cli import main
from memstack.config import BackboneConfig, ModelConfig
from memstack.data.tokenizers import get_tokenizer
from memstack.memory.sparse.config import EngramConfig
from memstack.memory.sparse.store import TableStore


def _ckpt(tmp_path):
    tok = get_tokenizer("bpe512")
    bb = BackboneConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, seg_len=32)
    torch.manual_seed(0)
    model = build_model(ModelConfig(bb, (EngramConfig(tokenizer="bpe512", rows_per_head=61, heads=2, head_dim=4),)))
    with torch.no_grad():
        for p in model.memory.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(model, tmp_path / "ck", meta={"tokenizer": "bpe512", "tokenizer_fingerprint": tok.fingerprint()})
    return model


def test_memory_cli_round_trip(tmp_path, capsys):
    model = _ckpt(tmp_path)
    ck, store = str(tmp_path / "ck"), str(tmp_path / "store")
    assert main(["memory", "stats", "--checkpoint", ck]) == 0
    stats = json.loads(capsys.readouterr().out)
    t = stats["tables"][0]
    assert t["table"] == "memory.memories.0.table" and t["namespaces"][0]["name"] == "knowledge"
    assert t["hash_layout"]["fingerprint"] == model.memory.memories[0].layout.fingerprint()
    assert main(["memory", "snapshot", "--checkpoint", ck, "--store", store]) == 0
    assert main(["memory", "learn", "--checkpoint", ck, "--store", store, "--text", "the code of kemo ravi is pano.",
                 "--steps", "3", "--lr", "0.05", "--max-row-norm", "10"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "3 updates accepted, 0 rejected" in out
    st = TableStore(store)
    w1, w2 = st.load(1), st.load(2)
    changed = (w1 != w2).any(1).sum().item()
    assert 0 < changed == st.version(2).touched
    # a replica at version 1 receives the delta
    replica = str(tmp_path / "replica")
    assert main(["memory", "snapshot", "--checkpoint", ck, "--store", replica]) == 0
    assert main(["memory", "export", "--store", store, "--from", "1", "--to", "2", "--out", str(tmp_path / "d.st")]) == 0
    assert main(["memory", "import", "--store", replica, "--delta", str(tmp_path / "d.st")]) == 0
    assert torch.equal(TableStore(replica).load(), w2)
    assert main(["memory", "rollback", "--store", store, "--version", "1"]) == 0
    assert main(["memory", "log", "--store", store]) == 0
    log = capsys.readouterr().out
    assert "* v1" in log and "  v2" in log
    assert main(["memory", "apply", "--checkpoint", ck, "--store", store, "--version", "2", "--out", str(tmp_path / "ck2")]) == 0
    m2, meta = load_checkpoint(tmp_path / "ck2")
    assert torch.equal(m2.memory.memories[0].table.weight.detach(), w2) and meta["table_version"] == 2
    for (n, p), q in zip(model.named_parameters(), m2.parameters()):
        if "table" not in n:
            assert torch.equal(p, q), n                       # learning touched only table rows


def test_memory_cli_rejects_with_reasons(tmp_path, capsys):
    _ckpt(tmp_path)
    ck, store = str(tmp_path / "ck"), str(tmp_path / "store")
    assert main(["memory", "learn", "--checkpoint", ck, "--store", store, "--text", "hi"]) == 2
    assert "not a table store" in capsys.readouterr().err
    main(["memory", "snapshot", "--checkpoint", ck, "--store", store])
    rc = main(["memory", "learn", "--checkpoint", ck, "--store", store, "--text", "the code of kemo ravi is pano.",
               "--steps", "1", "--lr", "100", "--max-row-norm", "0.001"])
    out = capsys.readouterr().out
    assert rc == 1 and "update rejected, table unchanged" in out and "norm cap 0.001" in out
    assert TableStore(store).head == 1
    assert main(["memory", "rollback", "--store", store, "--version", "9"]) == 2
    assert "v000009.json is missing" in capsys.readouterr().err


def test_memory_learn_validates_its_options_like_a_config(tmp_path, capsys):
    """--quota 0 is not "no quota" and --max-row-norm nan is not "no cap": both are refused, with
    every other bad option, before anything is loaded; `none` spells "no quota" / "no cap"."""
    _ckpt(tmp_path)
    ck, store = str(tmp_path / "ck"), str(tmp_path / "store")
    assert main(["memory", "snapshot", "--checkpoint", ck, "--store", store]) == 0
    capsys.readouterr()
    text = ["--text", "the code of kemo ravi is pano."]
    rc = main(["memory", "learn", "--checkpoint", ck, "--store", store, *text, "--quota", "0", "--max-row-norm", "nan",
               "--lr", "-1", "--steps", "0", "--top-t", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "5 problem(s)" in err
    for want in ("quotas['knowledge'] must be a positive integer", "max_row_update_norm must be a finite number > 0",
                 "lr must be a finite number > 0", "--steps must be >= 1", "top_t must be a positive integer"):
        assert want in err, want
    for norm in ("inf", "-1", "0"):
        assert main(["memory", "learn", "--checkpoint", ck, "--store", store, *text, "--max-row-norm", norm]) == 2
        assert "max_row_update_norm must be a finite number > 0" in capsys.readouterr().err
    assert TableStore(store).head == 1                                      # nothing was written
    assert main(["memory", "learn", "--checkpoint", ck, "--store", store, *text, "--steps", "1", "--lr", "0.05",
                 "--quota", "none", "--max-row-norm", "none"]) == 0
    assert TableStore(store).head == 2
    # a quota of 1 row per version: the update touches more, so it is rejected and nothing is committed
    capsys.readouterr()
    assert main(["memory", "learn", "--checkpoint", ck, "--store", store, *text, "--steps", "1", "--quota", "1"]) == 1
    assert "write quota of 1" in capsys.readouterr().out and TableStore(store).head == 2
