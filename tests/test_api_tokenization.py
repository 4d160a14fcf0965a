"""/tokenize and /detokenize (vLLM's shapes): a prompt's ids are the tokenizer's, a conversation's are the ids a
chat request with the same messages prefills, and ids come back as their text; bad input is a 400."""
import httpx
import pytest

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hello, tokenizer!"}]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", headers=server.headers, json=body, timeout=60)


def test_prompt_and_conversation_tokens_round_trip(server, openai_client, hf_smollm_tokenizer):
    prompt = _post(server, "/tokenize", {"prompt": "Hello, tokenizer!", "return_token_strs": True}).json()
    assert prompt["tokens"] == hf_smollm_tokenizer.encode("Hello, tokenizer!")
    assert prompt["count"] == len(prompt["tokens"]) and prompt["max_model_len"] == 2048
    assert "".join(prompt["token_strs"]).replace("Ġ", " ") == "Hello, tokenizer!"
    back = _post(server, "/detokenize", {"tokens": prompt["tokens"]}).json()
    assert back == {"prompt": "Hello, tokenizer!"}
    chat = _post(server, "/tokenize", {"model": "smollm2", "messages": HI}).json()
    used = openai_client.chat.completions.create(model="smollm2", messages=HI, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == used


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": HI}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-5"}, 404, "model"),
    ("/detokenize", {"tokens": [1, -2]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
], ids=["nothing", "both", "messages-empty", "prompt-number", "model-unknown", "negative-id", "id-out-of-vocab",
        "tokens-string"])
def test_bad_input_is_a_4xx(server, path, body, status, param):
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.post(f"{server.base_url}/tokenize", json={"prompt": "a"}).status_code == 401  # the key is needed
