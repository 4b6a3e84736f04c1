"""Drives a running infermesh gateway with the official `openai` SDK and
checks every response body against OpenAI's own JSON Schemas.

Usage: openai_client.py BASE_URL API_KEY SCHEMAS_JSON
Prints one line `RESULT {json}` with what the caller needs to cross-check
(request ids and costs); exits non-zero on the first failed check.
"""

import base64
import json
import struct
import sys

import urllib.error
import urllib.request
import jsonschema
import openai

base_url, api_key, schemas_path = sys.argv[1], sys.argv[2], sys.argv[3]
with open(schemas_path) as f:
    schemas = json.load(f)


def check(name, body):
    """Validate `body` against the named schema from the OpenAI spec."""
    schema = {"$ref": f"#/$defs/{name}", "$defs": schemas["$defs"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def error_body(response):
    body = response.json()
    check("ErrorResponse", body)
    return body["error"]

class Raw:
    """A raw HTTP response: status and parsed JSON body."""

    def __init__(self, status, body):
        self.status_code = status
        self._body = body

    def json(self):
        return json.loads(self._body)

    @property
    def text(self):
        return self._body.decode(errors="replace")


def raw(method, path, content=None, json_body=None, key=None):
    data = json.dumps(json_body).encode() if json_body is not None else content
    request = urllib.request.Request(f"{base_url}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {key or api_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return Raw(response.status, response.read())
    except urllib.error.HTTPError as err:
        return Raw(err.code, err.read())


client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
result = {}

# Non-streaming chat.
chat = client.chat.completions.create(
    model="infermesh/gemma-3-270m",
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=16,
)
check("CreateChatCompletionResponse", json.loads(chat.to_json()))
assert chat.object == "chat.completion"
assert chat.id.startswith("chatcmpl-"), chat.id
assert chat.choices[0].message.role == "assistant"
assert chat.choices[0].message.content, "empty completion"
assert chat.choices[0].finish_reason in ("stop", "length")
usage = chat.usage
assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
cost = usage.model_extra["cost"]
assert cost > 0, usage
assert usage.model_extra["is_byok"] is False
assert chat.model_extra["provider"] == "infermesh"
result["chat"] = {"id": chat.id, "cost": cost, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}

# The account surface: the generation record, credit, the key's own state.
record = raw("GET", f"/generation?id={chat.id}").json()["data"]
assert record["id"] == chat.id and record["model"] == "infermesh/gemma-3-270m", record
assert abs(record["total_cost"] - cost) < 1e-12, (record, cost)
assert (record["tokens_prompt"], record["tokens_completion"]) == (usage.prompt_tokens, usage.completion_tokens)
for bad_query in ("/generation", "/generation?id=a&id=b"):
    refused = raw("GET", bad_query)
    assert refused.status_code == 400 and error_body(refused)["param"] == "id", (bad_query, refused.text)
credit = raw("GET", "/credits").json()["data"]
assert credit["total_credits"] > 0 and abs(credit["total_usage"] - cost) < 1e-12, credit
me = raw("GET", "/auth/key").json()["data"]
assert me["label"] == "default" and me["is_free_tier"] is True and me["calls"] == 1, me
assert me["tokens_used"] == {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens}, me
assert me["rate_limit"]["requests"] > 0 and me["limit"] is None, me

# A second key with a tiny limit: listed by prefix only, capped, revocable.
created = raw("POST", "/keys", json_body={"name": "ci", "limit": 0.000001, "expires_at": "2099-01-01T00:00:00Z"})
assert created.status_code == 201, created.text
second = created.json()
assert second["key"].startswith("im_") and second["data"]["limit"] == 0.000001, second
assert second["data"]["expires_at"].startswith("2099-01-01"), second
listed_keys = raw("GET", "/keys").json()["data"]
assert {k["name"] for k in listed_keys} == {"default", "ci"}, listed_keys
assert all(second["key"] not in json.dumps(k) and len(k["prefix"]) < 12 for k in listed_keys), listed_keys
capped = raw("POST", "/chat/completions", key=second["key"],
             json_body={"model": "infermesh/gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000})
assert capped.status_code == 402 and "credit limit" in error_body(capped)["message"], capped.text
assert raw("DELETE", f"/keys/{second['data']['id']}").status_code == 200
revoked = raw("GET", "/auth/key", key=second["key"])
assert revoked.status_code == 401 and "revoked" in error_body(revoked)["message"], revoked.text
assert raw("DELETE", "/keys/key_doesnotexist").status_code == 404

# Another account cannot read this account's generation.
other = json.loads(urllib.request.urlopen(urllib.request.Request(
    f"{base_url}/auth/signup", data=json.dumps({"email": f"other-{chat.id}@example.com"}).encode())).read())["key"]
assert raw("GET", f"/generation?id={chat.id}", key=other).status_code == 404

# Streaming chat with include_usage: every chunk valid, usage last, then [DONE].
stream = client.chat.completions.create(
    model="gemma-3-270m",
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=12,
    stream=True,
    stream_options={"include_usage": True},
)
text, chunks, final_usage, finish, stream_id = "", 0, None, None, None
for chunk in stream:
    chunks += 1
    stream_id = chunk.id
    check("CreateChatCompletionStreamResponse", json.loads(chunk.to_json()))
    if chunk.choices:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        final_usage = chunk.usage
assert chunks >= 3, chunks
assert text, "stream produced no text"
assert finish in ("stop", "length"), finish
assert final_usage is not None and final_usage.completion_tokens > 0, final_usage
assert final_usage.model_extra["cost"] > 0
result["stream"] = {"id": stream_id, "cost": final_usage.model_extra["cost"], "text": text}

# Legacy completions: a text prompt and the same prompt as token ids (from
# /tokenize) give the same greedy text; streaming yields text chunks.
root = base_url.rsplit("/v1", 1)[0]
prompt = "The capital of France is"
by_text = client.completions.create(model="infermesh/gemma-3-270m", prompt=prompt, max_tokens=8, temperature=0)
assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-"), by_text.id
assert by_text.choices[0].text and by_text.choices[0].finish_reason == "length"
assert by_text.usage.completion_tokens == 8 and by_text.usage.model_extra["cost"] > 0
tokenized = json.loads(urllib.request.urlopen(urllib.request.Request(
    f"{root}/tokenize", data=json.dumps({"model": "gemma-3-270m", "prompt": prompt}).encode(),
    headers={"Authorization": f"Bearer {api_key}"})).read())
assert tokenized["tokens"] == [2, 818, 5279, 529, 7001, 563], tokenized  # llama.cpp's ids
assert tokenized["count"] == 6 and tokenized["max_model_len"] == 32768
by_ids = client.completions.create(model="infermesh/gemma-3-270m", prompt=tokenized["tokens"], max_tokens=8, temperature=0)
assert by_ids.choices[0].text == by_text.choices[0].text, (by_ids.choices[0].text, by_text.choices[0].text)
detokenized = json.loads(urllib.request.urlopen(urllib.request.Request(
    f"{root}/detokenize", data=json.dumps({"model": "gemma-3-270m", "tokens": tokenized["tokens"][1:]}).encode(),
    headers={"Authorization": f"Bearer {api_key}"})).read())
assert detokenized["prompt"] == prompt, detokenized
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model="infermesh/gemma-3-270m", prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
assert streamed == by_text.choices[0].text, (streamed, by_text.choices[0].text)

# Sampling knobs. n choices from one prefill, each with logprobs.
several = client.chat.completions.create(
    model="infermesh/gemma-3-270m", messages=[{"role": "user", "content": "Name an animal."}],
    max_tokens=6, n=2, temperature=1.0, seed=11, logprobs=True, top_logprobs=3,
)
check("CreateChatCompletionResponse", json.loads(several.to_json()))
assert [c.index for c in several.choices] == [0, 1], several.choices
for choice in several.choices:
    entries = choice.logprobs.content
    assert entries, choice
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3, entry
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
assert several.usage.completion_tokens == sum(len(c.logprobs.content) for c in several.choices), several.usage
# The same seed reproduces the same choices.
again = client.chat.completions.create(
    model="infermesh/gemma-3-270m", messages=[{"role": "user", "content": "Name an animal."}],
    max_tokens=6, n=2, temperature=1.0, seed=11,
)
assert [c.message.content for c in again.choices] == [c.message.content for c in several.choices]
# Streamed n=2: every chunk valid, both indexes finish.
finished = set()
for chunk in client.chat.completions.create(
        model="infermesh/gemma-3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
        temperature=0.7, seed=3, stream=True, logprobs=True):
    check("CreateChatCompletionStreamResponse", json.loads(chunk.to_json()))
    for choice in chunk.choices:
        if choice.finish_reason:
            finished.add(choice.index)
assert finished == {0, 1}, finished
# Legacy logprobs: one entry per generated token.
legacy = client.completions.create(model="infermesh/gemma-3-270m", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens == 5, lp
assert "".join(lp.tokens) == legacy.choices[0].text, (lp.tokens, legacy.choices[0].text)
# vLLM-style extras: ignore_eos runs to max_tokens; logit_bias forces a token.
forced = client.completions.create(
    model="infermesh/gemma-3-270m", prompt=prompt, max_tokens=20, temperature=0,
    extra_body={"ignore_eos": True, "min_p": 0.05, "repetition_penalty": 1.1, "top_k": 20},
)
assert forced.usage.completion_tokens == 20 and forced.choices[0].finish_reason == "length", forced
paris = json.loads(urllib.request.urlopen(urllib.request.Request(
    f"{root}/tokenize", data=json.dumps({"model": "gemma-3-270m", "prompt": " Paris", "add_special_tokens": False}).encode(),
    headers={"Authorization": f"Bearer {api_key}"})).read())["tokens"]
assert len(paris) == 1, paris
biased = client.completions.create(
    model="infermesh/gemma-3-270m", prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(paris[0]): 100})
assert biased.choices[0].text == " Paris" * 3, biased.choices[0].text
for bad, param in (({"n": 0}, "n"), ({"top_logprobs": 2}, "top_logprobs"), ({"min_p": 2}, "min_p"),
                   ({"logit_bias": {"x": 1}}, "logit_bias")):
    refused = raw("POST", "/chat/completions", json_body={
        "model": "infermesh/gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], **bad})
    assert refused.status_code == 400 and error_body(refused)["param"] == param, (bad, refused.text)

# Embeddings, float and base64.
emb = client.embeddings.create(model="infermesh/all-minilm-l6-v2", input=["The cat sat.", "A feline rested.", "Stock prices fell."])
check("CreateEmbeddingResponse", json.loads(emb.to_json()))
vectors = [d.embedding for d in emb.data]
assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
for v in vectors:
    norm = sum(x * x for x in v) ** 0.5
    assert abs(norm - 1.0) < 1e-3, norm
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]), "similar sentences should be closer"
b64 = raw("POST", "/embeddings", json_body={"model": "infermesh/all-minilm-l6-v2", "input": "The cat sat.", "encoding_format": "base64"}).json()
decoded = struct.unpack("<384f", base64.b64decode(b64["data"][0]["embedding"]))
assert max(abs(a - b) for a, b in zip(decoded, vectors[0])) < 1e-6
sdk_b64 = client.embeddings.create(model="infermesh/all-minilm-l6-v2", input="The cat sat.", encoding_format="base64")
assert len(sdk_b64.data[0].embedding) in (384, 2048), "the SDK decodes or passes base64 through"

# Models.
models = client.models.list()
listed = raw("GET", "/models").json()
check("ListModelsResponse", listed)
ids = {m.id for m in models.data}
assert {"infermesh/gemma-3-270m", "infermesh/all-minilm-l6-v2"} <= ids, ids
for m in listed["data"]:
    assert float(m["pricing"]["prompt"]) >= 0 and m["context_length"] > 0 and m["capabilities"], m
one = client.models.retrieve("infermesh/gemma-3-270m")
check("Model", json.loads(one.to_json()))
assert one.id == "infermesh/gemma-3-270m"

# Errors: each in OpenAI's shape, raised as the SDK's own exception types.
try:
    openai.OpenAI(base_url=base_url, api_key="im_" + "x" * 40, max_retries=0).chat.completions.create(
        model="infermesh/gemma-3-270m", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("a bad key was accepted")
except openai.AuthenticationError as err:
    assert err.status_code == 401
    assert error_body(err.response)["type"] == "authentication_error"

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    assert error_body(err.response)["code"] == "model_not_found"

try:
    client.chat.completions.create(model="infermesh/gemma-3-270m", messages=[{"role": "user", "content": "hi"}], temperature=7)
    raise AssertionError("temperature 7 was accepted")
except openai.BadRequestError as err:
    assert error_body(err.response)["param"] == "temperature"

try:
    client.chat.completions.create(model="infermesh/gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=40000)
    raise AssertionError("max_tokens beyond the context window was accepted")
except openai.BadRequestError as err:
    error = error_body(err.response)
    assert error["code"] == "context_length_exceeded", error
    assert "40000" in error["message"] and "32768" in error["message"], error

malformed = raw("POST", "/chat/completions", content=b'{"model": "infermesh/gemma-3-270m", "messages": [')
assert malformed.status_code == 400, malformed.status_code
assert error_body(malformed)["type"] == "invalid_request_error"

wrong_type = raw("POST", "/chat/completions", json_body={"model": "infermesh/gemma-3-270m", "messages": "hello"})
assert wrong_type.status_code == 400 and error_body(wrong_type)["param"] == "messages", wrong_type.text

print("RESULT " + json.dumps(result), flush=True)
