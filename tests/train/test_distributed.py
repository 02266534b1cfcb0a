"""Data parallelism: `memstack train` under torchrun (2 CPU processes, gloo) must train the same
model as one process on the same global batch; a resumed data-parallel run must continue
exactly; a batch that does not split over the processes is refused with a clear error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memstack.checkpoint import load_checkpoint
from memstack.data.packing import DocumentStream, ExampleSource
from memstack.train.run import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
CONFIG = """\
model: {d_model: 32, n_layers: 2, n_heads: 4, seg_len: 32}
memories: [{kind: xl, mem_len: 32}]
task: {kind: lm, tokenizer: byte, eval_tokens: 2000, eval_split: val}
train: {lr: 0.003, warmup_steps: 1, batch_size: BATCH, max_steps: 4, n_segments: 2, log_every: 1, ckpt_every: 2}
device: cpu
"""



def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def train(config: Path, out: Path, nproc: int = 1, resume: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--standalone"]     # the launcher binds a free port itself: no port picked here and raced for
    cmd += ["-m", "memstack", "train", "--config", str(config), "--out", str(out), "--no-progress"]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    # generous: three of these run per module, each importing torch in 2-3 processes; on a shared
    # 2-core machine under load one took over 180 s (a deadline guards against hangs, not speed)
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(ckpt)
    return model.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process and one 2-process run of the same config (4 steps, checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.replace("BATCH", "4"))
    single, ddp = root / "single", root / "ddp"
    _ok(train(cfg, single))
    _ok(train(cfg, ddp, nproc=2))
    return cfg, single, ddp


def test_two_processes_train_the_same_model_as_one(runs):
    _, single, ddp = runs
    a, b = latest_checkpoint(single), latest_checkpoint(ddp)
    assert a.name == b.name == "step-0000004"
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # the training changed the weights (so the comparison means something)
    first = _params(single / "ckpt" / "step-0000002")
    assert any(not torch.allclose(first[k], pa[k], atol=1e-4) for k in pa)


def test_two_processes_log_the_global_loss_once(runs):
    _, single, ddp = runs
    la, lb = _log(single), _log(ddp)
    assert len(la) == len(lb)                                 # only rank 0 writes the log
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    np.testing.assert_allclose([r["loss"] for r in lb], [r["loss"] for r in la], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in lb], [r["grad_norm"] for r in la], rtol=1e-4)
    assert [(r["tokens"], r["target_tokens"], r["lr"]) for r in lb] == [(r["tokens"], r["target_tokens"], r["lr"]) for r in la]
    assert la[-1]["tokens"] == 4 * 4 * 2 * 32                  # global rows x steps x segments x seg_len


def test_two_processes_checkpoint_the_global_data_position(runs):
    _, single, ddp = runs
    ta = json.loads((latest_checkpoint(single) / "trainer.json").read_text())
    tb = json.loads((latest_checkpoint(ddp) / "trainer.json").read_text())
    assert tb["source"] == ta["source"]
    assert (tb["step"], tb["tokens"], tb["target_tokens"]) == (ta["step"], ta["tokens"], ta["target_tokens"])


def test_resumed_two_process_run_continues_exactly(runs, tmp_path):
    """Resume the 2-process run from its step-2 checkpoint: steps 3-4 must repeat the uninterrupted
    run. The carried memory state of *every* rank has to be in the checkpoint for this to hold."""
    cfg, _, ddp = runs
    start = tmp_path / "step-0000002"
    shutil.copytree(ddp / "ckpt" / "step-0000002", start)
    out = tmp_path / "resumed"
    _ok(train(cfg, out, nproc=2, resume=start))
    want = {r["step"]: r["loss"] for r in _log(ddp)}
    got = {r["step"]: r["loss"] for r in _log(out)}
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=1e-6)
    pa, pb = _params(latest_checkpoint(ddp)), _params(latest_checkpoint(out))
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_batch_not_divisible_by_processes_is_refused(tmp_path):
    cfg = tmp_path / "odd.yaml"
    cfg.write_text(CONFIG.replace("BATCH", "3"))
    proc = train(cfg, tmp_path / "out", nproc=2)
    assert proc.returncode != 0
    assert "must be divisible" in proc.stderr and "batch_size (3)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "ckpt").exists()


@pytest.mark.parametrize("rows, world", [(3, 2), (4, 3), (1, 2)])
def test_sources_refuse_rows_that_do_not_split(rows, world):
    docs = [np.arange(1, 20)]
    with pytest.raises(ValueError, match=rf"rows \({rows}\) must be divisible by the number of processes \({world}\)"):
        DocumentStream(docs, rows, 8, 0, rank=0, world=world)
    x = np.zeros((5, 12), dtype=np.int64)
    with pytest.raises(ValueError, match=rf"rows \({rows}\) must be divisible by the number of processes \({world}\)"):
        ExampleSource(x, x, rows, 8, rank=world - 1, world=world)
