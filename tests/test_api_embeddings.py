"""POST /v1/embeddings through the official client and raw HTTP: the vectors are sentence-transformers' for
all-MiniLM-L6-v2 (float and base64), and bad input is an OpenAI error naming the field."""
import base64

import httpx
import numpy as np
import pytest

from tests.conftest import API_KEY

TEXTS = ["How do I make a tuple?", "The Zorblat river is 412 kilometres long.", "Über naïve café"]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    from models.bert import default_embedding_model
    return SentenceTransformer(str(default_embedding_model()), device="cpu").encode(TEXTS)


def _cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_vectors_match_the_sentence_transformers_reference(openai_client, reference):
    got = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "all-MiniLM-L6-v2"
    assert _cosine([d.embedding for d in got.data], reference).min() > 0.999
    assert got.usage.prompt_tokens == got.usage.total_tokens > len(TEXTS) * 3
    one = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[1])
    assert len(one.data) == 1 and _cosine(one.data[0].embedding, reference[1]) > 0.999


def test_base64_is_the_float32_bytes(server, reference):
    r = httpx.post(f"{server.base_url}/v1/embeddings", headers=server.headers, timeout=60,
                   json={"input": TEXTS, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    assert all(v.shape == (384,) for v in vectors) and _cosine(vectors, reference).min() > 0.999


@pytest.mark.parametrize("body,status,param,words", [
    ({"input": ""}, 400, "input", "empty string"),
    ({"input": []}, 400, "input", "must not be empty"),
    ({"input": [1, 2, 10**9]}, 400, "input", "token ids must be in"),
    ({"input": [[1, 2], []]}, 400, "input", "empty list"),
    ({"input": "word " * 600}, 400, "input", "reads at most 256"),
    ({"input": "hi", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens", ""),
    ({"input": "hi", "model": "text-embedding-3-small"}, 404, "model", "does not exist"),
    ({"input": "hi", "dimensions": 256}, 400, "dimensions", "384 dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", ""),
    ({"input": 3}, 400, "input", ""),
])
def test_bad_input_is_an_openai_error(server, body, status, param, words):
    r = httpx.post(f"{server.base_url}/v1/embeddings", headers=server.headers, timeout=60, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param, error


def test_token_ids_embed_as_their_text_and_long_input_is_cut_only_when_asked(openai_client, server, reference):
    from models.bert import SentenceEncoder, default_embedding_model
    encoder = SentenceEncoder(default_embedding_model())
    ids = [encoder.token_ids(t) for t in TEXTS]
    got = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=ids)  # a list of token-id lists
    assert _cosine([d.embedding for d in got.data], reference).min() > 0.999
    one = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=ids[1])  # one list of ids
    assert _cosine(one.data[0].embedding, reference[1]) > 0.999
    long = "word " * 600
    cut = httpx.post(f"{server.base_url}/v1/embeddings", headers=server.headers, timeout=60,
                     json={"input": long, "truncate_prompt_tokens": -1}).json()
    assert cut["usage"]["prompt_tokens"] == 256  # all-MiniLM-L6-v2's max_seq_length, as sentence-transformers cuts
    short = httpx.post(f"{server.base_url}/v1/embeddings", headers=server.headers, timeout=60,
                       json={"input": long, "truncate_prompt_tokens": 10}).json()
    assert short["usage"]["prompt_tokens"] == 10


def test_needs_the_api_key(server):
    r = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": "hi"}, timeout=30)
    assert r.status_code == 401 and API_KEY not in r.text
