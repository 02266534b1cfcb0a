"""The OpenAI-compatible API with the real `openai` client against a real server on 127.0.0.1:
outputs equal the library's decoder token for token, streaming equals non-streaming, chat uses the
documented template, seeds and n, stop strings never leak, logprobs equal the model's, usage counts
cached prompt tokens, errors come in OpenAI's shape with the field named."""
from __future__ import annotations

import json
import threading

import openai
import pytest
import torch

from memstack.engine import Engine, EngineConfig
from memstack.generate import Decoder, SamplingConfig, generate
from memstack.server.chat import DEFAULT_TEMPLATE, ChatTemplate
from tests.server.conftest import TOK, raw, request, responses


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def lib(model, ids, n):
    out = [int(t) for t in generate(model, ids, SamplingConfig(max_new_tokens=n, stop_ids=(TOK.eot_id,)))]
    return out


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "memstack"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_the_library(server, client):
    model = server.loop.engine.model
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    ids = r.choices[0].token_ids
    want = lib(model, TOK.encode("Hello there"), 12)
    assert ids == want
    assert r.choices[0].text == TOK.decode([t for t in ids if t != TOK.eot_id])
    assert r.choices[0].finish_reason == ("stop" if want[-1] == TOK.eot_id else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (11, len(want))
    assert r.usage.total_tokens == 11 + len(want) and r.object == "text_completion"


def test_token_id_prompts_and_batches(server, client):
    model = server.loop.engine.model
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=7, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.token_ids for c in r.choices] == [lib(model, p, 7) for p in prompts]


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", prompt="Streams of text", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert chunks[-1].choices[0].finish_reason == full.finish_reason
    chat_kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=15, temperature=0)
    full = client.chat.completions.create(**chat_kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat_kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 3, "stream": True, "temperature": 0}
    out = raw(server.port, request("POST", "/v1/completions", body, {"Connection": "close"}))
    head, _, payload = out.partition(b"\r\n\r\n")
    assert b"content-type: text/event-stream" in head.lower()
    events = [line for line in payload.decode("latin-1").split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_chat_uses_the_documented_default_template(server, client):
    model = server.loop.engine.model
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    prompt = "System: Be brief.\nUser: Hi\nAssistant:"
    assert ChatTemplate(DEFAULT_TEMPLATE).render([{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]) == prompt
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.usage.prompt_tokens == len(TOK.encode(prompt))
    assert r.choices[0].model_extra["token_ids"] == lib(model, TOK.encode(prompt), 10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"


def test_seed_and_n_sample_like_the_engine(server, client):
    model = server.loop.engine.model
    kw = dict(model="tiny", prompt="Dice", max_tokens=8, temperature=0.9, top_p=0.95, n=3, seed=1234,
              extra_body={"return_token_ids": True, "top_k": 50})
    a = [c.token_ids for c in client.completions.create(**kw).choices]
    b = [c.token_ids for c in client.completions.create(**kw).choices]
    assert a == b and len({tuple(x) for x in a}) > 1            # reproducible; choices differ from each other
    ref = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=200))
    want = ref.generate([TOK.encode("Dice")] * 3, [SamplingConfig(max_new_tokens=8, temperature=0.9, top_p=0.95,
                                                                  top_k=50, seed=1234 + i, stop_ids=(TOK.eot_id,))
                                                   for i in range(3)])
    assert a == want                                            # choice i samples with seed + i


def test_stop_strings_never_leak(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 8
    stop = text[5:7]
    want = text[:text.find(stop)]
    r = client.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert r.text == want and r.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == want


def test_logprobs_equal_the_models(server, client):
    model = server.loop.engine.model
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    ids = r.choices[0].model_extra["token_ids"]
    prompt = TOK.encode("User: Hi\nAssistant:")
    dec = Decoder(model)
    logits = [dec.feed(torch.tensor([prompt]))[0]]
    for t in ids[:-1]:
        logits.append(dec.feed(torch.tensor([[t]]))[0])
    content = r.choices[0].logprobs.content
    visible = [(t, lg) for t, lg in zip(ids, logits) if t != TOK.eot_id]
    assert len(content) == len(visible)
    for entry, (t, lg) in zip(content, visible):
        lp = torch.log_softmax(lg.float(), -1)
        assert entry.logprob == pytest.approx(float(lp[t]), abs=1e-4)
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)   # greedy: the best one
    legacy = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0, logprobs=2).choices[0]
    lp = legacy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_usage_reports_cached_prompt_tokens(client):
    prompt = "A long shared system prompt that repeats across requests. " * 2
    kw = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    first = client.completions.create(**kw).usage
    second = client.completions.create(**kw).usage
    n = len(TOK.encode(prompt))
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens_details.cached_tokens == (n - 1) // 4 * 4     # whole blocks of 4 before the last token


def test_concurrent_clients_share_the_batch(server, client):
    model = server.loop.engine.model
    prompts = [[1 + i, 2, 3 + i, 40, 50 + i] for i in range(6)]
    results = {}

    def worker(i):
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=15, temperature=0,
                                      extra_body={"return_token_ids": True})
        results[i] = r.choices[0].token_ids

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [results[i] for i in range(6)] == [lib(model, p, 15) for p in prompts]


def test_errors_come_in_openai_shape_naming_every_field(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=0, extra_body={"top_k": 2.5, "seed": 2**70})
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == "max_tokens"
    assert all(f in err["message"] for f in ("max_tokens", "top_k", "seed"))
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[1, 999], max_tokens=300)
    msg = e.value.body["message"]
    assert "token ids must be in" in msg and "exceeds max_model_len 200" in msg
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       frequency_penalty=0.5)
    assert "frequency_penalty: not supported" in e.value.body["message"]
    out = responses(raw(server.port, request("POST", "/v1/completions", raw_body=b"not json",
                                             headers={"Connection": "close"})))
    assert out[0][0] == 400 and "invalid JSON" in json.loads(out[0][1])["error"]["message"]
