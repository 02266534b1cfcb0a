"""`memstack datastore build | info` end to end on a small real corpus slice."""
from __future__ import annotations

import json

from memstack.cli import main
from memstack.memory.retrieval.store import Datastore


def test_build_retro_store_and_info(tmp_path, capsys):
    out = tmp_path / "retro"
    rc = main(["datastore", "build", "--kind", "retro", "--corpus", "moby_dick", "--split", "test", "--tokenizer", "byte",
               "--chunk", "16", "--key-dim", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = Datastore.open(out)
    assert len(s) > 1000 and s.schema["tokens"] == ("int64", (32,))
    capsys.readouterr()
    assert main(["datastore", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == len(s) and info["fingerprint"].startswith("retro-bag-of-tokens:v257:d8")


def test_build_without_required_arguments_says_what_is_missing(capsys):
    assert main(["datastore", "build", "--kind", "knn_lm"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--checkpoint" in err
    assert main(["datastore", "info", "/nonexistent/store"]) == 2
    assert "manifest.json missing" in capsys.readouterr().err
