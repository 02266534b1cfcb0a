"""Views of the data dir for tests: the required assets (and what is derived from them) without
the optional ones, whatever the machine has cached.

`memstack data fetch` keeps raw downloads in ``raw/`` and derived data in ``cache/``; the derived
data of an optional asset lives under ``cache/<asset name>`` (``cache/smollm2/``: the extracted
GGUF, its tokenizer, converted weights). A view is a fresh directory of symlinks to the real
files minus everything of the optional assets, so code under test sees a machine on which they
were never fetched, and whatever it writes lands in the view, not in the user's data dir.
"""
from __future__ import annotations

from pathlib import Path

from memstack.data.assets import ASSETS


def optional_names() -> list[str]:
    return [a.name for a in ASSETS.values() if a.optional]


def _of_optional(name: str) -> bool:
    return any(name == o or name.startswith((o + "-", o + ".")) for o in optional_names())


def without_optional_assets(source: Path, root: Path) -> Path:
    """Make `root` a data dir that sees `source`'s required assets and derived caches only."""
    raw, cache = root / "raw", root / "cache"
    raw.mkdir(parents=True)
    cache.mkdir()
    for asset in ASSETS.values():
        src = source / "raw" / asset.filename
        if not asset.optional and src.exists():
            (raw / asset.filename).symlink_to(src.resolve())
    if (source / "cache").is_dir():
        for entry in (source / "cache").iterdir():
            if not _of_optional(entry.name):
                (cache / entry.name).symlink_to(entry.resolve())
    return root
