"""Where a table's rows live, and fetching them before the layer that reads them runs.

Residency (a runtime choice; checkpoints are the same either way):
    device   the weight is an ordinary parameter on the model's device
    host     the weight stays in host memory (page-locked when CUDA is present, so copies to
             the GPU are asynchronous DMA); each step only the rows it reads cross over
    disk     the weight is a memory-mapped file (torch.from_file, shared): the OS pages rows
             in on demand, so a table larger than RAM works and resident memory stays small

Prefetch: Engram's rows depend only on token ids, so `Engram.prepare` computes them at the start
of a forward call and `maybe_prefetch` gathers them on a background thread (and, on CUDA,
copies them to the device on a side stream, recording an event the consumer waits on) while the
blocks before the Engram layer run. Gradients still reach the table: the prefetched rows enter
the graph through ops/gather's `prefetched=` path, whose backward is the table's sparse row
gradient (on the table's own device).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from memstack.memory.sparse.table import SparseTable

Residency = Literal["device", "host", "disk"]
_POOL: ThreadPoolExecutor | None = None   # created on first use (never at import time)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstack-prefetch")
    return _POOL


def residency_of(table: SparseTable) -> str:
    return getattr(table, "residency", "device")


def place_table(table: SparseTable, residency: Residency, path: str | Path | None = None, prefetch: bool = True) -> None:
    """Move `table`'s weight to `residency` (see the module docstring). `disk` writes the rows to
    `path` (created or overwritten) and maps them back. Values are unchanged."""
    if residency not in ("device", "host", "disk"):
        raise ValueError(f"residency must be device, host or disk, got {residency!r}")
    w = table.weight
    data = w.detach()
    if residency == "device":
        dev = getattr(table, "home_device", data.device)
        new = data.to(dev).clone()
    elif residency == "host":
        new = torch.empty(data.shape, dtype=data.dtype, pin_memory=torch.cuda.is_available())
        new.copy_(data)
    else:
        if path is None:
            raise ValueError("residency='disk' needs a path for the memory-mapped rows file")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n = data.numel()
        with open(path, "wb") as f:   # size the file, then map it and copy the rows in
            f.truncate(n * data.element_size())
        new = torch.from_file(str(path), shared=True, size=n, dtype=data.dtype).view(data.shape)
        new.copy_(data.cpu())
        table.disk_path = str(path)
    if residency != "device" and not hasattr(table, "home_device"):
        table.home_device = data.device
    table.weight = nn.Parameter(new, requires_grad=w.requires_grad)
    table.weight.sparse_grad = True
    table.residency = residency
    table.prefetch = prefetch and residency != "device"


def place_tables(model: nn.Module, residency: Residency, directory: str | Path | None = None, prefetch: bool = True) -> list[str]:
    """Place every SparseTable of `model`; disk tables go to `directory/<module name>.rows`.
    Call it after `model.to(device)` (which would move the tables back). Returns their names."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseTable):
            path = None if directory is None else Path(directory) / f"{name or 'table'}.rows"
            place_table(mod, residency, path, prefetch)
            names.append(name)
    return names


def _gather_to(table: SparseTable, rows: Tensor, device: torch.device) -> Tensor:
    """Gather on the table's side; returns the rows on `device` (CUDA: on a side stream, with the
    consumer's stream made to wait for it)."""
    from memstack.ops.gather import gather_torch

    w = table.weight.detach()
    flat = rows.reshape(-1).to(w.device)
    with torch.no_grad():
        out = gather_torch(w, flat).view(*rows.shape, w.shape[1])
        if device.type == "cuda" and out.device.type == "cpu":
            pinned = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            pinned.copy_(out)
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                dev = pinned.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            return dev, ev
    return out.to(device)


def _wait(x):
    if isinstance(x, tuple):   # (rows on the GPU, event of the copy): order the consumer after it
        dev, ev = x
        torch.cuda.current_stream(dev.device).wait_event(ev)
        return dev
    return x


class _Fetch:
    """A prefetch in flight: `result()` blocks until the rows are on the consumer's device."""

    def __init__(self, fut: Future):
        self.fut = fut

    def result(self) -> Tensor:
        return _wait(self.fut.result())


def maybe_prefetch(table: SparseTable, global_rows: Tensor) -> _Fetch | None:
    """Start gathering rows (any shape) of an offloaded table with prefetch on; None when the
    table is resident where the rows are wanted (it then gathers in the layer, as usual)."""
    if not getattr(table, "prefetch", False) or table.weight.device == global_rows.device and residency_of(table) == "device":
        return None
    device = global_rows.device
    rows = global_rows.to("cpu") if table.weight.device.type == "cpu" else global_rows
    return _Fetch(_pool().submit(_gather_to, table, rows, device))


def rows_file_bytes(table: SparseTable) -> int:
    p = getattr(table, "disk_path", None)
    return os.path.getsize(p) if p else 0
