"""Row-sharded tables under torchrun (2 CPU processes, gloo): the all-to-all lookup equals a
plain gather forward and backward; 2 processes with sharded tables train the same model as one
process with a replicated table; the sharded checkpoint (one shard file per rank) loads for
inference in one process and resumes on a different number of processes."""
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
from memstack.train.run import latest_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
CONFIG = """\
model: {d_model: 32, n_layers: 2, n_heads: 4, seg_len: 16}
memories: [{kind: engram, layers: [0], heads: 2, head_dim: 4, rows_per_head: 101}]
task: {kind: lm, tokenizer: byte, eval_tokens: 500, eval_split: val}
train: {lr: 0.003, warmup_steps: 1, batch_size: 6, max_steps: 4, n_segments: 2, log_every: 1, ckpt_every: 2, shard_tables: SHARD}
device: cpu
"""



def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone"]     # the launcher binds a free port itself: no port picked here and raced for


def train(config: Path, out: Path, nproc: int, resume: Path | None = None):
    cmd = (_torchrun(nproc) if nproc > 1 else [sys.executable]) + ["-m", "memstack", "train", "--config", str(config),
                                                                   "--out", str(out), "--no-progress"]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def _log(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


_GATHER = """
import torch, torch.distributed as dist
from memstack.memory.sparse.shard import block, sharded_gather
dist.init_process_group("gloo")
r, W = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
full = torch.randn(23, 5)
lo, hi = block(23, r, W)
local = full[lo:hi].clone().requires_grad_()
g = torch.Generator().manual_seed(r)
rows = torch.randint(-1, 23, (4, 7), generator=g)
gout = torch.randn(4, 7, 5, generator=g)
out = sharded_gather(local, rows, 23, W)
(out * gout).sum().backward()
ref = torch.where((rows >= 0)[..., None], full[rows.clamp(min=0)], torch.zeros(()))
assert torch.equal(out, ref), "forward"
# backward: every rank's contribution to my rows, averaged over ranks (DDP's convention)
want = torch.zeros(23, 5)
for q in range(W):
    gq = torch.Generator().manual_seed(q)
    rq = torch.randint(-1, 23, (4, 7), generator=gq)
    goq = torch.randn(4, 7, 5, generator=gq)
    v = rq >= 0
    want.index_add_(0, rq[v], goq[v])
assert local.grad.is_sparse
torch.testing.assert_close(local.grad.to_dense(), want[lo:hi] / W)
print("OK", r)
"""


def test_sharded_gather_equals_plain_gather_forward_and_backward(tmp_path):
    script = tmp_path / "g.py"
    script.write_text(_GATHER)
    p = subprocess.run(_torchrun(2) + [str(script)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("OK") == 2, p.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    sharded, plain = root / "sharded.yaml", root / "plain.yaml"
    sharded.write_text(CONFIG.replace("SHARD", "true"))
    plain.write_text(CONFIG.replace("SHARD", "false"))
    train(plain, root / "one", 1)
    train(sharded, root / "two", 2)
    return root, sharded, plain


def test_two_sharded_processes_train_the_same_model_as_one(runs):
    root, _, _ = runs
    a, b = latest_checkpoint(root / "one"), latest_checkpoint(root / "two")
    assert (b / "shards").is_dir() and not (a / "shards").exists()
    from memstack.memory.sparse.shard import shard_index

    index = shard_index(b)["memory.memories.0.table.weight"]        # sealed: every shard file with its SHA-256
    R = index["rows"]
    assert {k: len(v) for k, v in index["optim"].items()} == {"exp_avg": 2, "exp_avg_sq": 2, "row_step": 2}
    assert [(p["lo"], p["hi"]) for p in index["parts"]] == [(0, (R + 1) // 2), ((R + 1) // 2, R)]
    ma, _ = load_checkpoint(a)
    mb, _ = load_checkpoint(b)               # one process reads both ranks' shard files
    for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")
    np.testing.assert_allclose(list(_log(root / "two").values()), list(_log(root / "one").values()), rtol=1e-5)


@pytest.mark.parametrize("nproc, config", [(1, "plain"), (3, "sharded")])
def test_sharded_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path, nproc, config):
    root, sharded, plain = runs
    start = tmp_path / "step-0000002"
    shutil.copytree(root / "two" / "ckpt" / "step-0000002", start)
    cfg = {"plain": plain, "sharded": sharded}[config]
    ref = _log(root / "two")
    train(cfg, tmp_path / "resumed", nproc, resume=start)
    got = _log(tmp_path / "resumed")
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [ref[3], ref[4]], rtol=1e-5)
