"""`memstack serve` as a real process: the OpenAI client talks to it, keys from the environment
are enforced, an exposed host without keys is refused before the model loads, SIGTERM stops it."""
from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest

from memstack.checkpoint import save_checkpoint
from memstack.generate import SamplingConfig, generate
from tests.server.conftest import KEYS, TOK, tiny


def test_memstack_serve_runs_as_a_process(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ck", {"tokenizer": "byte", "tokenizer_fingerprint": TOK.fingerprint()})
    env = {**os.environ, "MEMSTACK_API_KEYS": f"acme={KEYS['acme']}"}
    p = subprocess.Popen([sys.executable, "-m", "memstack.cli", "serve", "--checkpoint", str(tmp_path / "ck"),
                          "--port", "0", "--block-size", "4", "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert "memstack serve:" in line, p.stderr.read() if p.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        assert "1 tenant(s)" in line and KEYS["acme"] not in line
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=60)
        r = c.completions.create(model="ck", prompt="Hi", max_tokens=5, temperature=0, extra_body={"return_token_ids": True})
        want = [int(t) for t in generate(model, TOK.encode("Hi"), SamplingConfig(max_new_tokens=5, stop_ids=(TOK.eot_id,)))]
        assert r.choices[0].token_ids == want
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong-0123456789abcdef", max_retries=0).models.list()
    finally:
        p.terminate()
        assert p.wait(timeout=20) is not None
    assert KEYS["acme"] not in p.stderr.read()


def test_serve_refuses_an_exposed_host_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEMSTACK_API_KEYS"}
    r = subprocess.run([sys.executable, "-m", "memstack.cli", "serve", "--checkpoint", str(tmp_path / "nothing"),
                        "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--allow-unauthenticated" in r.stderr
