"""Fixtures every test may use.

- every test runs with torch (and `random`) seeded from its own node id: fresh random inputs per
  test, identical on every run of that test;
- `poison_empty`: freshly allocated, uninitialised memory (torch.empty / empty_like /
  empty_strided / Tensor.new_empty, at the dispatcher level, so Python decompositions are caught
  too) comes back NaN-filled, so a kernel that reads memory it never wrote shows up as NaN.

Tolerances live in tests/tolerances.py (one table per dtype).

Triton kernels: without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set here
before any kernel module is imported), so every fast path is compared with its reference on CPU
too; on a GPU the same tests run the compiled kernels.

Optional assets (the SmolLM2 weights): with ``MEMSTACK_HIDE_OPTIONAL_ASSETS=1`` (what `.ci/run` sets)
the whole session, subprocesses included, runs on a view of the data dir without them
(tests/asset_views.py), so a machine that has them cached still proves that the suite passes
where they were never fetched: tests that need them skip, and nothing else notices.

Tests use tiny tensors, so torch runs single-threaded: intra-op parallelism buys nothing at these
sizes, and OpenMP threads spinning against another busy process on a 2-core machine make every
small matmul wait a scheduler tick (~15 ms instead of ~10 us).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_EMPTY_OPS = {
    _aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default,
    _aten.new_empty.default, _aten.new_empty_strided.default,
}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t in place with a value no correct computation produces by accident."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


class PoisonEmpty(TorchDispatchMode):
    """While active, every uninitialised allocation is poisoned; `count` says how many were."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY_OPS and isinstance(out, torch.Tensor) and out.numel():
            self.count += 1
            poison_(out)
        return out


_HIDE_ENV = "MEMSTACK_HIDE_OPTIONAL_ASSETS"
_view: Path | None = None


def pytest_configure(config) -> None:
    global _view
    torch.set_num_threads(1)
    if os.environ.get(_HIDE_ENV, "") not in ("", "0") and _view is None:
        from asset_views import without_optional_assets
        from memstack.data.assets import data_dir

        _view = without_optional_assets(data_dir(), Path(tempfile.mkdtemp(prefix="memstack-data-view-")))
        os.environ["MEMSTACK_DATA"] = str(_view)          # inherited by every subprocess too


def pytest_unconfigure(config) -> None:
    if _view is not None:
        shutil.rmtree(_view, ignore_errors=True)       # the view's links only; never what they point at


def pytest_report_header(config) -> str | None:
    if _view is not None:
        return f"optional data assets hidden ({_HIDE_ENV}): MEMSTACK_DATA={_view}"
    return None


@pytest.fixture(autouse=True)
def seed_from_test_name(request) -> int:
    """Seed torch and `random` from the test's node id (stable across runs and machines)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def poison_empty():
    """Run the test with NaN-poisoned uninitialised allocations; yields the PoisonEmpty mode."""
    with PoisonEmpty() as mode:
        yield mode
