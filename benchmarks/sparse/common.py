"""Shared pieces of the sparse-table benchmarks and claim checks: the tiny backbone, equal
activated parameters, training a (model, task) cell, provenance, result files."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.evals.bench import environment
from memstack.evals.task import build_task
from memstack.memory.sparse.config import EngramConfig
from memstack.train.config import TrainConfig
from memstack.train.distributed import DistInfo
from memstack.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "benchmarks" / "sparse"
IMG = REPO / "docs" / "benchmarks" / "img"           # plots: img/sparse_<name>.png


def backbone(seg_len: int = 64, d_ff: int | None = None, vocab: int = 512) -> BackboneConfig:
    return BackboneConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=seg_len, d_ff=d_ff)


def engram_dense_params(cfg: EngramConfig, bb: BackboneConfig) -> int:
    """Parameters an Engram activates per token besides its table rows (projections, norms, conv)."""
    m = build_model(ModelConfig(bb, (cfg,)))
    return sum(p.numel() for n, p in m.memory.named_parameters() if not n.endswith("table.weight"))


def matched_plain(cfg: EngramConfig, bb: BackboneConfig) -> tuple[BackboneConfig, int, int]:
    """A plain backbone whose SwiGLU is widened by Engram's dense parameters (equal activated
    parameters: table rows are looked up, not multiplied, like token embeddings).
    Returns (backbone, its extra params, Engram's dense params)."""
    extra = engram_dense_params(cfg, bb)
    d_ff = bb.ff_dim + round(extra / (3 * bb.d_model * bb.n_layers))
    wide = BackboneConfig(**{**bb.__dict__, "d_ff": d_ff})
    got = build_model(ModelConfig(wide, ())).num_params() - build_model(ModelConfig(bb, ())).num_params()
    return wide, got, extra


def train_cell(model_cfg: ModelConfig, task_cfg, train: TrainConfig, out_dir: Path | None = None, seed: int = 0,
               progress: bool = False) -> tuple[torch.nn.Module, dict, float]:
    torch.manual_seed(seed)
    task = build_task(task_cfg, model_cfg.backbone.seg_len)
    model = build_model(model_cfg)
    src = task.train_source(train.batch_size, seed)
    tr = Trainer(model, train, src, out_dir=out_dir, evaluate=task.evaluate, dist=DistInfo(device=torch.device("cpu")))
    t0 = time.perf_counter()
    rec = tr.fit(progress=progress)
    return model, rec, time.perf_counter() - t0


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    data = {**data, "env": environment(torch.device("cpu")), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    p = OUT / f"{name}.json"
    p.write_text(json.dumps(data, indent=1))
    return p
