"""Crash-safe, checksummed files: the one mechanism every store uses for what it writes.

Tensors go to content-named files, `<stem>-<sha256[:12]>.safetensors` (temporary name, then
rename), and are named with their SHA-256 by a JSON document; documents are replaced atomically.

Sealed documents. Every JSON document a store writes -- a manifest, a HEAD, an index -- is
*sealed*: it names its `kind` and `format` (version) and carries `checksum`, the SHA-256 of its
canonical content, and the file holds exactly the canonical text. `read_sealed` refuses, with an
error naming the file, anything else: a missing or truncated file, text that is not a JSON object,
another kind, an unsupported format (an older one says how to migrate), a checksum that does not
match (an edit), a field of the wrong type, and bytes that differ from the canonical text (even a
whitespace edit). A document signs what lies below it -- tensor files by SHA-256, other documents
by their checksum -- so one chain from the top (a HEAD) verifies every stored byte.

Writes clean up after themselves. Temporary files are named `.<name>.<pid>.<random>.tmp`, so
`clean_temporaries` can tell a crashed writer's leftovers (its process is gone) from a live
writer's. `StoreLock` serialises the writers of one store directory (and lets a store clean up
only when nobody is writing); content files no document references any more are removed by
`remove_unreferenced`.

The order of a write: (1) tensor files, (2) the documents naming them, lowest level first, (3)
the top document (HEAD) last, (4) remove what is no longer referenced. A crash at any point
leaves the last complete version readable.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import Tensor

from memstack.errors import IntegrityError

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]{8})\.tmp(?P<dir>dir)?$")
_LEGACY_TMP_RE = re.compile(r"^(?!\.).+\.[A-Za-z0-9_]{8}\.tmp$")      # tempfile.mkstemp names of older versions
LOCK_NAME = ".lock"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- temporaries

def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path` (same filesystem: the rename is atomic), carrying
    this process's id so that a later cleanup knows whether its writer is still alive."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temporaries(directory: Path, *, legacy: bool = False) -> list[Path]:
    """Remove the temporary files in `directory` whose writer process is gone (left by a crash);
    returns them. With `legacy` (only under an exclusive `StoreLock`: nobody else is writing),
    also older versions' temporary names, which carry no process id."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        stale = (m is not None and not _alive(int(m["pid"]))) or (legacy and m is None and _LEGACY_TMP_RE.match(p.name))
        if stale and p.is_dir() and m is not None and m["dir"]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif stale and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path`: temporary file, fsync, rename."""
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Serialise first (so an unserialisable value fails before anything is written), then write
    atomically. For documents other code reads back, prefer `write_sealed`."""
    write_bytes_atomic(path, json.dumps(data, indent=1).encode())


# ----------------------------------------------------------------------------- sealed documents

def _canonical(doc: dict) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode()


def seal(kind: str, format: int, body: dict) -> dict:
    """The sealed document: kind, format, the body's fields, and the checksum of all of them."""
    reserved = {"kind", "format", "checksum"} & set(body)
    if reserved:
        raise ValueError(f"a sealed document's body may not set {sorted(reserved)}")
    doc = {"kind": kind, "format": format, **body}
    doc["checksum"] = "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()
    return doc


def sealed_text(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def write_sealed(path: Path, kind: str, format: int, body: dict) -> str:
    """Seal `body` and write it atomically to `path`; returns its checksum (what the document
    one level up records to sign it)."""
    doc = seal(kind, format, body)
    write_bytes_atomic(Path(path), sealed_text(doc).encode())
    return doc["checksum"]


def _type_ok(value: Any, want: type | tuple[type, ...]) -> bool:
    kinds = want if isinstance(want, tuple) else (want,)
    if isinstance(value, bool) and bool not in kinds:
        return False                       # True is not an integer here
    return isinstance(value, kinds)


def _type_name(want: type | tuple[type, ...]) -> str:
    kinds = want if isinstance(want, tuple) else (want,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def read_sealed(path: Path, kind: str, format: int, fields: dict[str, type | tuple[type, ...]] | None = None,
                older: str | None = None) -> dict:
    """Read a sealed document of `kind` at `format`, checking everything listed in the module
    docstring and that each of `fields` is present with its type. `older`: what to do with a
    file of an earlier format (shown in the error). Raises IntegrityError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing") from None
    except OSError as e:
        raise IntegrityError(f"{path} cannot be read: {e}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        what = "empty" if not raw.strip() else "not valid JSON (truncated or corrupted)"
        raise IntegrityError(f"{path} is {what}: {e}") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{path} must hold a JSON object ({kind}), found {type(doc).__name__}: corrupted")
    fmt = doc.get("format")
    early = fmt is None or (isinstance(fmt, int) and not isinstance(fmt, bool) and fmt < format)
    if early and "checksum" not in doc:           # the unsealed layout of an earlier memstack
        hint = older or "re-create it with this version of memstack"
        raise IntegrityError(f"{path} has format {fmt or 1}, written by an older memstack without checksums (this one "
                             f"reads format {format}): {hint}")
    if doc.get("kind") != kind:
        raise IntegrityError(f"{path} is not a {kind} document (its kind is {doc.get('kind')!r})")
    if fmt != format:
        raise IntegrityError(f"{path} has format {fmt!r}; this memstack reads format {format} (a newer memstack "
                             "wrote it, or it was edited)")
    want = "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest() if "checksum" in doc else None
    if doc.get("checksum") != want or want is None:
        raise IntegrityError(f"{path} fails its checksum: it was edited or corrupted (refusing it)")
    if raw.decode("utf-8") != sealed_text(doc):
        raise IntegrityError(f"{path} differs from the text that was written (edited): refusing it")
    problems = [f"field {k!r} is missing" if k not in doc else f"field {k!r} must be {_type_name(t)}, got {doc[k]!r}"
                for k, t in (fields or {}).items() if k not in doc or not _type_ok(doc[k], t)]
    if problems:
        raise IntegrityError(f"{path} is malformed: " + "; ".join(problems))
    return doc


# ----------------------------------------------------------------------------- tensor files

class _Scratch:
    """A private temporary directory beside `path`, named for this process (`.<name>.<pid>.<rand>
    .tmpdir`): safetensors writes its own `.tmpXXXXXX` file before renaming, which carries no
    owner; inside this directory a crash's leftovers are still recognisably ours."""

    def __init__(self, path: Path):
        self.dir = Path(str(temp_path(path)) + "dir")

    def __enter__(self) -> Path:
        self.dir.mkdir()
        return self.dir

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, atomic and tidy (through a `_Scratch` directory)."""
    from safetensors.torch import save_file

    path = Path(path)
    with _Scratch(path) as d:
        save_file(tensors, str(d / path.name), metadata=metadata)
        os.replace(d / path.name, path)


def save_tensors_versioned(tensors: dict[str, Tensor], directory: Path, stem: str,
                           metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """Write tensors as `<stem>-<sha[:12]>.safetensors`; returns (file name, sha256)."""
    from safetensors.torch import save_file

    with _Scratch(Path(directory) / f"{stem}.safetensors") as d:
        tmp = d / "t.safetensors"
        save_file(tensors, str(tmp), metadata=metadata)
        sha = sha256_file(tmp)
        name = f"{stem}-{sha[:12]}.safetensors"
        os.replace(tmp, Path(directory) / name)
    return name, sha


def versioned_name_re(stem: str) -> re.Pattern:
    """Exactly the names `save_tensors_versioned(..., stem)` gives (not `<stem>-v2-...`)."""
    return re.compile(re.escape(stem) + r"-[0-9a-f]{12}\.safetensors")


def remove_unreferenced(directory: Path, stem: str, keep: set[str]) -> list[Path]:
    """Delete the `<stem>-<sha12>.safetensors` files in directory that no document references any
    more (only that exact pattern: another artefact whose name merely starts with `stem` is
    never touched). Returns them."""
    pat, removed = versioned_name_re(stem), []
    for f in Path(directory).glob(f"{glob_escape(stem)}-*.safetensors"):
        if pat.fullmatch(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# ----------------------------------------------------------------------------- writer lock

class StoreLock:
    """An advisory lock on a store directory (`<dir>/.lock`, flock): writers that must not
    interleave hold it exclusively (two processes never commit over each other); writers that may
    run side by side (chunk files of a KV tier) hold it shared; cleanup of orphans takes it
    exclusively, so it happens only while nobody writes. Released by the kernel when its process
    dies."""

    def __init__(self, directory: Path, shared: bool = False):
        self.path = Path(directory) / LOCK_NAME
        self.shared = shared
        self._fd: int | None = None

    def acquire(self, blocking: bool = True, timeout: float | None = 60.0) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if not blocking or (deadline is not None and time.monotonic() > deadline):
                    os.close(fd)
                    if blocking:
                        raise IntegrityError(f"{self.path.parent} is locked by another writer (waited {timeout:.0f} s)") from None
                    return False
                time.sleep(0.01)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def tidy(directory: Path, named: Callable[[], dict[str, str]], *, legacy: bool = False) -> list[Path]:
    """What opening a single-manifest artefact (saved state, checkpoint, KV export) cleans, when no
    writer holds the directory's lock: temporaries of dead writers and, for each stem -> the file
    its manifest names (`named()`, which reads and verifies the manifests), that stem's other
    content-named files (a crash between the tensor file and the manifest). A manifest that fails
    its checks leaves every data file in place. Returns what was removed; never raises for a
    read-only directory. `legacy`: also older versions' temporary names (`clean_temporaries`)."""
    lock = StoreLock(directory)
    try:
        if not lock.acquire(blocking=False):
            return []
    except OSError:
        return []
    try:
        removed = clean_temporaries(directory, legacy=legacy)
        try:
            keep = named()
        except (IntegrityError, OSError):
            return removed
        for stem, name in keep.items():
            removed += remove_unreferenced(directory, stem, {name})
        return removed
    finally:
        lock.release()


def iter_files(directory: Path) -> Iterator[Path]:
    """Every regular file under `directory` (for orphan reports and tests)."""
    return (p for p in sorted(Path(directory).rglob("*")) if p.is_file())
