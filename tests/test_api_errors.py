"""Bad input gets the right 4xx in OpenAI's error shape, never a 500, and the server goes on serving."""
import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2"
HI = [{"role": "user", "content": "Hi"}]


def chat(**fields):
    return ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 4, **fields})


def completion(**fields):
    return ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields})


LONG_TEXT = "word " * 2100  # more tokens than --max-model-len 2048

# (case id, (path, json body), status, the param the error names or None when any)
BAD_BODIES = [
    ("max_tokens-string", chat(max_tokens="lots"), 400, "max_tokens"),
    ("max_tokens-negative", chat(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-zero", chat(max_tokens=0), 400, "max_tokens"),
    ("completion-max_tokens-negative", completion(max_tokens=-1), 400, "max_tokens"),
    ("prompt_logprobs-25", completion(prompt_logprobs=25), 400, "prompt_logprobs"),
    ("max_tokens-float", chat(max_tokens=2.5), 400, "max_tokens"),
    ("temperature-5", chat(temperature=5), 400, "temperature"),
    ("temperature-string", chat(temperature="hot"), 400, "temperature"),
    ("top_p-0", chat(top_p=0), 400, "top_p"),
    ("n-0", chat(n=0), 400, "n"),
    ("stream-not-bool", chat(stream="true"), 400, "stream"),
    ("max_tokens-numeric-string", chat(max_tokens="10"), 400, "max_tokens"),
    ("presence_penalty-3", chat(presence_penalty=3), 400, "presence_penalty"),
    ("top_logprobs-25", chat(logprobs=True, top_logprobs=25), 400, "top_logprobs"),
    ("stop-number", chat(stop=7), 400, "stop"),
    ("logit_bias-huge-id", chat(logit_bias={"999999999": 5}), 400, None),
    ("logit_bias-bad-key", chat(logit_bias={"hello": 5}), 400, "logit_bias"),
    ("logit_bias-bad-value", chat(logit_bias={"42": 500}), 400, None),
    ("messages-empty", chat(messages=[]), 400, "messages"),
    ("messages-string", chat(messages="Hi"), 400, "messages"),
    ("messages-missing", ("/v1/chat/completions", {"model": MODEL}), 400, "messages"),
    ("role-unknown", chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, None),
    ("content-number", chat(messages=[{"role": "user", "content": 42}]), 400, None),
    ("prompt-too-long", chat(messages=[{"role": "user", "content": LONG_TEXT}], max_tokens=None), 400, None),
    ("prompt-plus-max_tokens-too-long", chat(max_tokens=2040), 400, "max_tokens"),
    ("completion-prompt-empty-list", completion(prompt=[]), 400, "prompt"),
    ("completion-prompt-empty-string", completion(prompt=""), 400, "prompt"),
    ("completion-token-id-out-of-vocab", completion(prompt=[1, 2, 10**9]), 400, "prompt"),
    ("completion-logprobs-25", completion(logprobs=25), 400, "logprobs"),
    ("stop_token_ids-out-of-vocab", chat(stop_token_ids=[10**9]), 400, None),
    ("top_k-negative", chat(top_k=-5), 400, None),
    ("unknown-model", chat(model="gpt-5"), 404, "model"),
]


def _assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as client:
        yield client


@pytest.mark.parametrize("case,request_,status,param", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_body_gets_openai_error(http, case, request_, status, param):
    path, body = request_
    body = {k: v for k, v in body.items() if v is not None}
    _assert_openai_error(http.post(path, json=body), status, param)
    if "stream" not in body:  # the same body, streamed, fails the same way before any event
        _assert_openai_error(http.post(path, json={**body, "stream": True}), status, param)


def test_missing_or_wrong_api_key_gets_401(server):
    path, body = chat()
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {server.api_key}"},
                    {"Authorization": "Bearer"}):
        r = httpx.post(server.base_url + path, json=body, headers=headers, timeout=30)
        _assert_openai_error(r, 401, None)
        assert r.headers["www-authenticate"] == "Bearer"
    _assert_openai_error(httpx.get(f"{server.base_url}/v1/models", timeout=30), 401, None)


def test_malformed_json_gets_400(http):
    for raw in (b"{not json", b'{"model": "smollm2", "messages": [', b"", b"[1, 2, 3]", b'"a string"'):
        r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        _assert_openai_error(r, 400, None)


def test_oversized_body_gets_413(http):
    huge = [{"role": "user", "content": "x" * (5 * 2**20)}]
    _assert_openai_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": huge}), 413, None)

    def chunks():  # no Content-Length: the limit holds for a chunked body too
        for _ in range(6):
            yield b"x" * 2**20
    _assert_openai_error(http.post("/v1/completions", content=chunks(),
                                   headers={"Content-Type": "application/json"}), 413, None)


def test_unknown_route_and_method_get_openai_errors(http):
    _assert_openai_error(http.get("/v1/nothing-here"), 404, None)
    _assert_openai_error(http.get("/v1/chat/completions"), 405, None)


def test_unknown_fields_are_ignored(http):
    path, body = chat(temperature=0, some_future_field={"x": 1}, another=[1, 2])
    r = http.post(path, json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_server_still_serves_after_all_the_bad_input(http, server):
    path, body = chat(messages=[{"role": "user", "content": "Name the capital of France."}], temperature=0,
                      max_tokens=30)
    r = http.post(path, json=body)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'tokenmill:num_requests_running{model_name="smollm2"} 0.0' in metrics
