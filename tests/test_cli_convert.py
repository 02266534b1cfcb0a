"""`memstack gqa`: convert a trained checkpoint to GQA / MQA and uptrain it from there."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml

from memstack.backbone.gqa import pool_kv_weight
from memstack.checkpoint import load_checkpoint
from memstack.cli import main
from memstack.train.run import latest_checkpoint

MHA_RUN = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "seg_len": 16},
    "memories": [],
    "task": {"kind": "lm", "corpus": "sotu", "tokenizer": "byte", "eval_split": "val", "eval_tokens": 500},
    "train": {"lr": 0.003, "max_steps": 2, "warmup_steps": 1, "batch_size": 2, "n_segments": 1, "log_every": 1},
    "device": "cpu",
}


def quiet(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mha_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    cfg = root / "mha.yaml"
    cfg.write_text(yaml.safe_dump(MHA_RUN))
    torch.manual_seed(0)
    rc, _, err = quiet(["train", "--config", str(cfg), "--out", str(root / "mha"), "--no-progress"])
    assert rc == 0, err
    return root, cfg


def test_gqa_command_writes_a_pooled_checkpoint(mha_run):
    root, _ = mha_run
    rc, out, err = quiet(["gqa", "--checkpoint", str(root / "mha"), "--kv-heads", "1", "--out", str(root / "mqa")])
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["kv_heads"] == [4, 1] and rep["method"] == "mean"
    assert rep["kv_bytes_per_token_fp32"] == [2 * 2 * 4 * 8 * 4, 2 * 2 * 1 * 8 * 4]
    mha, _ = load_checkpoint(latest_checkpoint(root / "mha"))
    mqa, meta = load_checkpoint(root / "mqa")
    assert mqa.cfg.backbone.n_kv_heads == 1
    assert meta["kv_pooling"] == "mean" and meta["tokenizer"] == "byte" and meta["task"]["kind"] == "lm"
    w = mha.blocks[1].attn.wv.weight
    assert torch.allclose(mqa.blocks[1].attn.wv.weight, w.view(4, 8, 32).mean(0))
    assert torch.allclose(mqa.blocks[1].attn.wv.weight, pool_kv_weight(w, 4, 1))
    assert torch.equal(mqa.blocks[0].attn.wq.weight, mha.blocks[0].attn.wq.weight)


def test_uptraining_starts_from_the_converted_weights(mha_run):
    root, cfg = mha_run
    assert quiet(["gqa", "--checkpoint", str(root / "mha"), "--kv-heads", "2", "--out", str(root / "g2")])[0] == 0
    rc, out, err = quiet(["train", "--config", str(cfg), "--out", str(root / "g2-up"), "--no-progress",
                          f"init_from={root / 'g2'}", "model.n_kv_heads=2", "train.max_steps=1", "train.lr=1e-9"])
    assert rc == 0, err
    conv, _ = load_checkpoint(root / "g2")
    up, _ = load_checkpoint(latest_checkpoint(root / "g2-up"))
    # one step at lr 1e-9: the uptrained model starts from (and stays next to) the converted weights
    for (k, a), b in zip(conv.state_dict().items(), up.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_gqa_command_refuses_bad_head_counts(mha_run, tmp_path):
    root, _ = mha_run
    rc, _, err = quiet(["gqa", "--checkpoint", str(root / "mha"), "--kv-heads", "3", "--out", str(tmp_path / "x")])
    assert rc == 2 and "must divide the model's KV head count (4" in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ adapter

@pytest.fixture(scope="module")
def prefix_run(mha_run):
    """A prefix tuned on the frozen MHA backbone (trainable: memory) -- the run writes an adapter."""
    root, cfg = mha_run
    rc, out, err = quiet(["train", "--config", str(cfg), "--out", str(root / "prefix"), "--no-progress",
                          f"init_from={root / 'mha'}", "memories=[{kind: prefix, n_prefix: 3, reparam_hidden: 16}]",
                          "train.trainable=memory", "train.max_steps=2"])
    assert rc == 0, err
    return root


def test_memory_only_training_writes_an_adapter_that_evaluates_like_the_checkpoint(prefix_run):
    root = prefix_run
    adapter = root / "prefix" / "adapter"
    files = {p.name.split("-")[0] for p in adapter.iterdir() if p.name != ".lock"}
    assert files == {"adapter.json", "adapter"}
    size = sum(p.stat().st_size for p in adapter.iterdir())
    full = sum(p.stat().st_size for p in latest_checkpoint(root / "prefix").glob("model-*.safetensors"))
    assert size < full / 4
    rc1, out1, err1 = quiet(["eval", "--checkpoint", str(adapter)])
    rc2, out2, err2 = quiet(["eval", "--checkpoint", str(root / "prefix")])
    assert rc1 == 0 and rc2 == 0, err1 + err2
    assert json.loads(out1)["bpb"] == json.loads(out2)["bpb"]


def test_adapter_extract_info_and_peft_round_trip(prefix_run):
    root = prefix_run
    rc, out, err = quiet(["adapter", "extract", "--checkpoint", str(root / "prefix"), "--out", str(root / "ex")])
    assert rc == 0, err
    rc, out, err = quiet(["adapter", "info", "--adapter", str(root / "ex")])
    info = json.loads(out)
    assert rc == 0 and [m["kind"] for m in info["memories"]] == ["prefix"]
    assert info["parameters"] == 3 * 32 + 32 * 16 + 16 + 16 * (2 * 2 * 4 * 8) + 2 * 2 * 4 * 8
    rc, out, err = quiet(["adapter", "export-peft", "--adapter", str(root / "ex"), "--out", str(root / "peft")])
    assert rc == 0, err
    assert json.loads((root / "peft" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    rc, out, err = quiet(["adapter", "import-peft", "--peft", str(root / "peft"), "--backbone", str(root / "mha"),
                          "--out", str(root / "back")])
    assert rc == 0, err
    model, _ = load_checkpoint(latest_checkpoint(root / "prefix"))
    from memstack.train.run import load_for_inference

    back, _, _ = load_for_inference(root / "back", "cpu")
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(back.eval()(x)[0].logits, model.eval()(x)[0].logits, atol=1e-5)


def test_adapter_commands_say_what_they_need(prefix_run, tmp_path):
    rc, _, err = quiet(["adapter", "export-peft", "--adapter", str(prefix_run / "ex")])
    assert rc == 2 and "needs --out" in err
    rc, _, err = quiet(["adapter", "import-peft", "--peft", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "exactly one of --pretrained" in err
