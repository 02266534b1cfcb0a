"""SmolLM2-135M-Instruct behind the server (optional asset; skipped cleanly without it): the chat
template is the one its GGUF carries, and -- slow -- the real model answers a chat completion."""
from __future__ import annotations

import pytest

from memstack.errors import AssetError


def _tokenizer_or_skip():
    from memstack.data import smollm2
    from memstack.data.tokenizers import get_tokenizer

    try:
        smollm2.gguf_path()
    except AssetError as e:
        pytest.skip(f"the optional smollm2 asset is not fetched (`memstack data fetch smollm2`): {e}")
    try:
        return get_tokenizer("smollm2")
    except ImportError as e:
        pytest.skip(f"needs the hf extra: {e}")


def test_chat_template_comes_from_the_gguf():
    from memstack.server.chat import chat_template, stop_ids

    tok = _tokenizer_or_skip()
    t = chat_template(tok)
    text = t.render([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok.encode(text)
    assert ids[0] == tok.encode("<|im_start|>")[0] == 1 and ids.count(2) == 2        # special tokens, not text
    assert stop_ids(tok, t) == (tok.eot_id, 2)                                      # <|endoftext|>, <|im_end|>


@pytest.mark.slow
def test_smollm2_answers_a_chat_completion():
    import openai

    from memstack.engine import Engine, EngineConfig
    from memstack.hf.pretrained import load_pretrained
    from memstack.memory.kv.config import DenseKVConfig
    from memstack.server import Server, ServerConfig

    tok = _tokenizer_or_skip()
    model = load_pretrained("smollm2", [DenseKVConfig()])
    eng = Engine(model, EngineConfig(block_size=16, kv_memory_mb=256, max_model_len=1024),
                 tokenizer=f"{tok.name}:{tok.fingerprint()}")
    srv = Server(eng, tok, ServerConfig(port=0, model_name="smollm2", log_level="warning")).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 20
    finally:
        srv.stop()
