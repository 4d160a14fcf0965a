"""Chat grounded in an index (tokenmill rag index, then serve --rag-index): the sources go into the prompt, the
response carries citations whose offsets point at their text, streaming carries them too, and a server without
an index, or with a broken one, says so."""
import asyncio
import json
from pathlib import Path

import httpx
import pytest

from models.bert import SentenceEncoder
from rag.chunker import read_document
from server.errors import APIError
from server.protocol import RagRequest
from server.retrieval import Retrieval
from tests.conftest import RunningServer

QUESTION = "How long is the Zorblat river?"


def _chat(server, rag, stream=False, **extra):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
            "temperature": 0, "stream": stream, **extra}
    if rag is not None:
        body["rag"] = rag
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers, json=body, timeout=120)


def test_answers_carry_citations_that_point_at_their_text(server):
    plain, grounded = _chat(server, None), _chat(server, True)
    assert plain.status_code == grounded.status_code == 200, grounded.text
    assert "citations" not in plain.json()
    body = grounded.json()
    citations = body["citations"]
    assert [c["number"] for c in citations] == [1, 2, 3, 4]
    assert citations[0]["text"].startswith("The Zorblat river is 412") and citations[0]["title"] == "Rivers of Zorbland"
    assert [c["score"] for c in citations] == sorted((c["score"] for c in citations), reverse=True)
    for c in citations:
        source_text = read_document(Path(c["source"]))[c["start"]:c["end"]]
        assert source_text == c["text"] and all(q in source_text for q in c["quotes"])
    # the sources are in the prompt
    assert body["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 60
    answer = body["choices"][0]["message"]["content"]
    assert [c["cited"] for c in citations] == [f"[{c['number']}]" in answer for c in citations]
    assert citations[0]["quotes"] and citations[0]["cited"], answer  # the 135M model repeats the river sentence


def test_top_k_query_and_streaming(server):
    one = _chat(server, {"top_k": 1, "query": "national dish"}).json()
    assert len(one["citations"]) == 1 and "smoked eel" in one["citations"][0]["text"]
    whole = _chat(server, {"top_k": 2}).json()
    r = _chat(server, {"top_k": 2}, stream=True)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    cited = [e for e in events if "citations" in e]
    assert events[0] is cited[0] and cited[-1]["choices"][0]["finish_reason"] is not None
    assert [c["text"] for c in cited[0]["citations"]] == [c["text"] for c in whole["citations"]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert cited[-1]["citations"] == whole["citations"]


@pytest.mark.parametrize("rag,words", [({"top_k": 0}, "top_k"), ({"top_k": 2, "query": ""}, "query"),
                                       ("yes", "rag")])
def test_bad_rag_options_are_400(server, rag, words):
    r = _chat(server, rag)
    assert r.status_code == 400 and words in json.dumps(r.json()["error"]), r.text


def test_rag_without_an_index_is_a_clear_400():
    with pytest.raises(APIError) as e:
        asyncio.run(Retrieval(SentenceEncoder()).ground([{"role": "user", "content": "hi"}], RagRequest()))
    assert e.value.status == 400 and e.value.param == "rag" and "--rag-index" in str(e.value)


def test_a_broken_index_stops_start_up_with_a_clear_error(rag_index, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(rag_index, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "dimension": 768}))
    with pytest.raises(RuntimeError, match="has 384"):
        RunningServer("default", "--kv-cache-memory", "64MiB", "--rag-index", str(broken))
