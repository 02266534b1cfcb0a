"""Row-wise sharding of tables over torch.distributed, and sharded checkpoints.

Under `torchrun` with `train.shard_tables: true`, every `SparseTable` is split into contiguous
row blocks, one per process (rank r owns rows [r * ceil(R/W), (r+1) * ceil(R/W))); the dense
part of the model stays data-parallel (DDP ignores the shards). A lookup is the TorchRec /
Engram §2.5 pattern, on plain torch.distributed collectives (gloo on CPU, NCCL on GPU):

    forward:  ids are bucketed by owner -> all-to-all of counts, then of ids -> each owner gathers
              its rows -> all-to-all of rows back -> un-permute
    backward: the rows' gradients go back to their owners (all-to-all); each owner's shard gets a
              sparse gradient of the rows it served, divided by the world size so that it equals
              what DDP's gradient averaging gives a replicated table (so 1 and N processes train
              the same model)

Checkpoints: each rank writes its block to `shards/<param>.rows-<lo>-<hi>.safetensors` (and its
rows' optimizer state to `shards/optim.<param>.<key>.rows-<lo>-<hi>.safetensors`); rank 0 then
indexes every file with its SHA-256 in the sealed `shards/index.json`, whose checksum the
checkpoint's config.json records (memstack/atomic.py); the weights file holds everything else. Loading reads
the rows a process owns under *its* world size (any number of processes, or the whole table for
a single process) by slicing the shard files (safetensors slices: never the whole table on one
rank), so a run saved on 2 processes resumes on 1 or 3.

TorchRec (sharded EmbeddingCollections) was tried with our torch pin: see docs/sparse.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from memstack.atomic import read_sealed, sha256_file, write_sealed
from memstack.errors import CheckpointError, IntegrityError

INDEX_KIND, INDEX_FORMAT = "memstack-shard-index", 1


def block(rows: int, rank: int, world: int) -> tuple[int, int]:
    per = math.ceil(rows / world)
    return min(rows, rank * per), min(rows, (rank + 1) * per)


def _a2a(x: Tensor, send: list[int], recv: list[int]) -> Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send)
    return out


class _ShardedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, rows: Tensor, total: int, world: int) -> Tensor:
        per = math.ceil(total / world)
        valid = (rows >= 0).nonzero().flatten()                      # positions with a row
        r = rows[valid]
        owner = r // per
        order = torch.argsort(owner, stable=True)
        r_sorted = r[order]
        send = torch.bincount(owner, minlength=world)                # ids this rank asks of each owner
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_l, recv_l = send.tolist(), recv.tolist()
        asked = _a2a(r_sorted, send_l, recv_l)                       # global rows others ask of me
        lo = dist.get_rank() * per
        vals = local.index_select(0, asked - lo)                     # (M, D)
        got = _a2a(vals, recv_l, send_l)                             # (N_valid, D) in owner order
        out = local.new_zeros(rows.shape[0], local.shape[1])
        out[valid[order]] = got
        ctx.save_for_backward(valid[order], asked - lo)
        ctx.send, ctx.recv, ctx.world, ctx.local_shape = send_l, recv_l, world, local.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pos, local_rows = ctx.saved_tensors
        g = _a2a(grad_out[pos], ctx.send, ctx.recv) / ctx.world      # (M, D) gradients of the rows I served
        grad = torch.sparse_coo_tensor(local_rows[None], g, ctx.local_shape, check_invariants=False)
        return grad, None, None, None


def sharded_gather(local: Tensor, rows: Tensor, total: int, world: int) -> Tensor:
    """rows (...) global ids in [-1, total) -> (..., D), fetched from their owners."""
    flat = rows.reshape(-1)
    return _ShardedGather.apply(local, flat, total, world).reshape(*rows.shape, local.shape[1])


def shard_tables(model: nn.Module, rank: int, world: int) -> list[str]:
    """Keep only this rank's row block of every SparseTable (in place). Returns the parameter
    names of the shards (for DDP to ignore)."""
    from memstack.memory.sparse.table import SparseTable

    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseTable) and getattr(mod, "shard", None) is None:
            lo, hi = block(mod.n_rows, rank, world)
            w = mod.weight
            mod.weight = nn.Parameter(w.detach()[lo:hi].clone(), requires_grad=w.requires_grad)
            mod.weight.sparse_grad = True
            mod.weight.sharded = True
            mod.shard = (rank, world, lo, hi)
            names.append(f"{name}.weight" if name else "weight")
    return names


# ----------------------------------------------------------------------------- checkpoints

def sharded_params(model: nn.Module) -> dict[str, tuple[nn.Module, Tensor]]:
    from memstack.memory.sparse.table import SparseTable

    return {(f"{n}.weight" if n else "weight"): (m, m.weight) for n, m in model.named_modules()
            if isinstance(m, SparseTable) and getattr(m, "shard", None) is not None}


def write_shards(model: nn.Module, directory: Path) -> None:
    """Every rank: write this rank's rows of each sharded table (call on all ranks, then barrier;
    rank 0 writes the index with `write_shard_index`)."""
    from safetensors.torch import save_file

    d = Path(directory) / "shards"
    d.mkdir(parents=True, exist_ok=True)
    for name, (mod, w) in sharded_params(model).items():
        _, _, lo, hi = mod.shard
        save_file({"rows": w.detach().contiguous().cpu()}, str(d / f"{name}.rows-{lo}-{hi}.safetensors"))


def write_shard_index(model: nn.Module, directory: Path) -> str:
    """Rank 0, after every rank wrote its shards: the sealed index of every shard file (rows and
    optimizer state) with its SHA-256. Returns its checksum."""
    import re

    d = Path(directory) / "shards"
    tables = {}
    for name, (mod, w) in sharded_params(model).items():
        _, world, _, _ = mod.shard
        parts = []
        for r in range(world):
            lo, hi = block(mod.n_rows, r, world)
            f = d / f"{name}.rows-{lo}-{hi}.safetensors"
            parts.append({"lo": lo, "hi": hi, "file": f.name, "sha256": sha256_file(f)})
        optim: dict[str, list] = {}
        pat = re.compile(re.escape(f"optim.{name}.") + r"([A-Za-z_]+)\.rows-(\d+)-(\d+)\.safetensors")
        for f in sorted(d.glob(f"optim.{name}.*.rows-*.safetensors")):
            m = pat.fullmatch(f.name)
            if m:
                optim.setdefault(m[1], []).append({"lo": int(m[2]), "hi": int(m[3]), "file": f.name, "sha256": sha256_file(f)})
        tables[name] = {"rows": mod.n_rows, "dim": mod.dim, "parts": parts, "optim": optim}
    return write_sealed(d / "index.json", INDEX_KIND, INDEX_FORMAT, {"tables": tables})


def shard_index(directory: Path, expect: str | None = None) -> dict[str, dict]:
    """The verified shard index of a checkpoint ({} when it has no shards); with `expect`, it must
    be the index the checkpoint's config.json recorded."""
    d = Path(directory) / "shards"
    if not d.is_dir():
        return {}
    doc = read_sealed(d / "index.json", INDEX_KIND, INDEX_FORMAT, {"tables": dict})
    if expect is not None and doc["checksum"] != expect:
        raise IntegrityError(f"{d / 'index.json'} is not the shard index its checkpoint recorded (checksum differs)")
    return doc["tables"]


def _verified(f: Path, sha: str) -> Path:
    if not f.is_file() or sha256_file(f) != sha:
        raise CheckpointError(f"{f}: missing or checksum mismatch -- the sharded checkpoint is corrupted")
    return f


def read_rows(directory: Path, name: str, lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of sharded parameter `name`, sliced from the shard files (checksummed)."""
    from safetensors import safe_open

    d = Path(directory) / "shards"
    idx = shard_index(directory).get(name)
    if idx is None:
        raise CheckpointError(f"{directory} has no shards of {name}")
    pieces = []
    for part in idx["parts"]:
        a, b = max(lo, part["lo"]), min(hi, part["hi"])
        if a >= b:
            continue
        f = _verified(d / part["file"], part["sha256"])
        with safe_open(str(f), "pt") as fh:
            pieces.append(fh.get_slice("rows")[a - part["lo"]:b - part["lo"]])
    out = torch.cat(pieces) if pieces else torch.zeros(0, idx["dim"])
    if out.shape[0] != hi - lo:
        raise CheckpointError(f"{directory}: shards of {name} cover {out.shape[0]} of rows [{lo}, {hi})")
    return out


def table_modules(model: nn.Module) -> dict:
    """Weight name -> SparseTable, for every table of the model."""
    from memstack.memory.sparse.table import SparseTable

    return {(f"{n}.weight" if n else "weight"): m for n, m in model.named_modules() if isinstance(m, SparseTable)}


def load_shards_into(model: nn.Module, directory: Path, names: list[str]) -> None:
    """Fill the tables named `names` (full or sharded) from a checkpoint's shard files."""
    params = dict(model.named_parameters())
    mods = table_modules(model)
    for name in names:
        mod = mods[name]
        lo, hi = (mod.shard[2], mod.shard[3]) if getattr(mod, "shard", None) else (0, mod.n_rows)
        with torch.no_grad():
            params[name].copy_(read_rows(directory, name, lo, hi))


# ----------------------------------------------------------------------------- optimizer state

def _row_optimizer_of(opt, p: Tensor):
    from memstack.memory.sparse.row_optim import RowSparseOptimizer

    for o in getattr(opt, "optimizers", [opt]):
        if isinstance(o, RowSparseOptimizer) and any(q is p for g in o.param_groups for q in g["params"]):
            return o
    return None


def write_state_shards(model: nn.Module, opt, directory: Path) -> None:
    """Every rank: the row-indexed optimizer state (Adam moments and per-row steps, Adagrad sums)
    of its table rows, as `shards/optim.<param>.<key>.rows-<lo>-<hi>.safetensors`."""
    from safetensors.torch import save_file

    d = Path(directory) / "shards"
    d.mkdir(parents=True, exist_ok=True)
    for name, (mod, w) in sharded_params(model).items():
        o = _row_optimizer_of(opt, w)
        _, _, lo, hi = mod.shard
        for key, t in (o.state.get(w, {}) if o is not None else {}).items():
            save_file({"rows": t.detach().contiguous().cpu()}, str(d / f"optim.{name}.{key}.rows-{lo}-{hi}.safetensors"))


def _state_index(directory: Path) -> dict[str, dict[str, list[tuple[int, int, Path]]]]:
    """param -> key -> [(lo, hi, file)] of the optimizer-state shard files (checksums verified)."""
    d = Path(directory) / "shards"
    return {name: {key: [(p["lo"], p["hi"], _verified(d / p["file"], p["sha256"])) for p in parts]
                   for key, parts in t.get("optim", {}).items()}
            for name, t in shard_index(directory).items()}


def load_state_shards(model: nn.Module, opt, directory: Path) -> None:
    """Fill the optimizer state of every table (sharded or not) from state shard files, slicing
    the rows this process owns under its own world size."""
    from safetensors import safe_open

    idx = _state_index(directory)
    for name, mod in table_modules(model).items():
        if name not in idx:
            continue
        w = mod.weight
        o = _row_optimizer_of(opt, w)
        if o is None:
            raise CheckpointError(f"{directory}: {name} has row-optimizer state but the optimizer has no row group for it")
        lo, hi = (mod.shard[2], mod.shard[3]) if getattr(mod, "shard", None) else (0, mod.n_rows)
        algo = next(g["optimizer"] for g in o.param_groups if any(q is w for q in g["params"]))
        st = o.init_state(w, algo)
        for key, parts in idx[name].items():
            pieces = []
            for a0, b0, f in sorted(parts):
                a, b = max(lo, a0), min(hi, b0)
                if a < b:
                    with safe_open(str(f), "pt") as fh:
                        pieces.append(fh.get_slice("rows")[a - a0:b - a0])
            rows = torch.cat(pieces)
            if key not in st or rows.shape != st[key].shape:
                raise CheckpointError(f"{directory}: optimizer state {name}.{key} does not fit this optimizer")
            st[key].copy_(rows)
