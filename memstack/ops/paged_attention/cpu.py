"""The CPU fast path of paged attention: a small C kernel (cpu_kernel.c) that reads K/V in place
through the block tables, built with the system C compiler on first use and called through ctypes.

Why a compiled kernel: any torch-op path must gather the visible blocks into a buffer before
attention (reading every byte twice and writing it once) and pays ~5 us of dispatch per op, so at
small sizes it loses to contiguous SDPA on dispatch alone and at large sizes on memory traffic
(issue 10 measured 0.12-0.14x). The kernel reads each K/V byte once, in one call.

Build: `$CC` (default `cc`) with -O3 -march=native -fopenmp (then without -march=native, then
without OpenMP, if the compiler refuses them), cached as
`$MEMSTACK_KERNEL_CACHE` (default `~/.cache/memstack-kernels`)/paged_attention-<hash>.so, the hash
covering the source, the compiler's version, the flags and the CPU's feature flags, written to a
temporary file and renamed (two processes building at once both succeed). No compiler, a failed
build, or `MEMSTACK_CPU_KERNELS=0`: `unavailable()` says why and the dispatcher uses the torch path.
The .so links the OpenMP runtime torch already loaded (same soname), so `torch.set_num_threads`
governs its threads too. No autograd: the dispatcher sends inputs that need gradients to the
torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

_SRC = Path(__file__).with_name("cpu_kernel.c")
_BASE = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast"]
# tried in order: a compiler without -march=native (some clang targets) or OpenMP (Apple clang)
# still builds the kernel, vectorized for the baseline ISA and/or single-threaded
_FLAG_SETS = [["-march=native", "-fopenmp"], ["-fopenmp"], []]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why_not: str | None = None
_DTYPES = (torch.float32, torch.bfloat16)


class _Args(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("q_sn", ctypes.c_int64), ("q_sh", ctypes.c_int64),
                ("k", ctypes.c_void_p), ("k_sb", ctypes.c_int64), ("k_sh", ctypes.c_int64), ("k_st", ctypes.c_int64),
                ("v", ctypes.c_void_p), ("v_sb", ctypes.c_int64), ("v_sh", ctypes.c_int64), ("v_st", ctypes.c_int64),
                ("tables", ctypes.c_void_p), ("t_ss", ctypes.c_int64), ("M", ctypes.c_int64),
                ("cu", ctypes.c_void_p), ("starts", ctypes.c_void_p), ("ends", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("o_sn", ctypes.c_int64), ("o_sh", ctypes.c_int64),
                ("S", ctypes.c_int64), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
                ("bs", ctypes.c_int64), ("num_blocks", ctypes.c_int64),
                ("scale", ctypes.c_float), ("bf16", ctypes.c_int32), ("n_threads", ctypes.c_int32)]


def cache_dir() -> Path:
    env = os.environ.get("MEMSTACK_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "memstack-kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([_SRC.read_text(), cc, version, repr([_BASE, _FLAG_SETS]), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    d = cache_dir()
    so = d / f"paged_attention-{key}.so"
    if not so.exists():
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
        os.close(fd)
        errors = []
        try:
            for extra in _FLAG_SETS:
                r = subprocess.run([cc, *_BASE, *extra, str(_SRC), "-o", tmp, "-lm"], capture_output=True, text=True,
                                   timeout=300)
                if r.returncode == 0:
                    os.replace(tmp, so)
                    break
                errors.append(f"{cc} {' '.join(extra) or '(no extra flags)'}: {r.stderr.strip()[-1000:]}")
            else:
                raise RuntimeError(f"could not compile {_SRC.name}:\n" + "\n".join(errors))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    lib.memstack_paged_attention.argtypes = [ctypes.POINTER(_Args)]
    lib.memstack_paged_attention.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None when it cannot be had (see unavailable())."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is None and _why_not is None:
            if os.environ.get("MEMSTACK_CPU_KERNELS", "1") == "0":
                _why_not = "disabled by MEMSTACK_CPU_KERNELS=0"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _why_not = f"CPU paged attention kernel unavailable: {e}"
    return _lib


def unavailable() -> str | None:
    """Why the compiled kernel cannot be used (None: it can). Builds it if not yet tried."""
    load()
    return _why_not


def takes(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """`not supports(...)`, fast (the dispatcher asks on every call)."""
    dt = q.dtype
    return (q.is_cpu and k_cache.is_cpu and (dt is torch.float32 or dt is torch.bfloat16) and k_cache.dtype is dt
            and v_cache.dtype is dt and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)))


def supports(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> list[str]:
    """Reasons the kernel cannot take these inputs (empty: it can). Does not build the kernel."""
    r = []
    if q.device.type != "cpu" or k_cache.device.type != "cpu":
        r.append("not on the CPU")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        r.append(f"dtypes q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}: needs all float32 or all bfloat16")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        r.append("k/v cache without unit stride on head_dim")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        r.append("gradients requested (the kernel has no backward)")
    return r


def _idx(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def paged_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor,
                        ends: Tensor, cu_seqlens: Tensor | None = None, scale: float | None = None,
                        out: Tensor | None = None) -> Tensor:
    """Packed paged attention, see cpu_kernel.c. q (N, H, D); k/v_cache (num_blocks, Hkv, bs, D);
    block_tables (S, M); starts, ends (S,); cu_seqlens (S + 1,) or None (N == S, one query each).
    Sequence s's query j of n_s sees slots [starts[s], ends[s] - n_s + j + 1). Returns (N, H, D),
    written into `out` when given (a preallocated (N, H, D) tensor of q's dtype)."""
    lib = load()
    if lib is None:
        raise RuntimeError(_why_not)
    if q.stride(-1) != 1:
        q = q.contiguous()
    N, H, D = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty(N, H, D, dtype=q.dtype)
    if H % Hkv or k_cache.shape[3] != D or out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"paged attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, out "
                         f"{tuple(out.shape)}: heads must be a multiple of kv heads, head dims equal, out like q")
    tables = _idx(block_tables, torch.int32)
    st, en = _idx(starts, torch.int64), _idx(ends, torch.int64)
    cu = _idx(cu_seqlens, torch.int64) if cu_seqlens is not None else None
    qs, ks, vs, os_ = q.stride(), k_cache.stride(), v_cache.stride(), out.stride()
    a = _Args(q.data_ptr(), qs[0], qs[1], k_cache.data_ptr(), ks[0], ks[1], ks[2], v_cache.data_ptr(), vs[0], vs[1],
              vs[2], tables.data_ptr(), tables.stride()[0], tables.shape[1], cu.data_ptr() if cu is not None else None,
              st.data_ptr(), en.data_ptr(), out.data_ptr(), os_[0], os_[1],
              st.shape[0], H, Hkv, D, bs, k_cache.shape[0], scale if scale is not None else 1.0 / math.sqrt(D),
              q.dtype == torch.bfloat16, torch.get_num_threads())
    rc = lib.memstack_paged_attention(ctypes.byref(a))
    if rc:
        raise ValueError({-1: "paged attention: a block table names a block outside the cache",
                          -3: "paged attention: a visible range starts below 0 or runs past its block table"}
                         .get(rc, f"paged attention kernel failed (code {rc}: out of memory)"))
    return out
