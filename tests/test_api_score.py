"""`tokenmill serve REWARD_MODEL`: /score answers with the reward model's own scores (vLLM's score shape), one
prompt against several answers or pair by pair, with the API's errors for bad requests."""
import httpx
import pytest

from models.reward import load_reward_model
from tests.conftest import RunningServer
from tests.test_dpo import _pairs
from training.reward import RewardSettings, reward


@pytest.fixture(scope="module")
def reward_server(toy_pretrained_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    out = reward(RewardSettings(model=str(toy_pretrained_dir), data=[_pairs(tmp / "p.jsonl", 32, 0)],
                                out_dir=str(tmp / "rm"), max_steps=4, batch_size=8, warmup_steps=1, progress=False))
    server = RunningServer(str(out), "--served-model-name", "rm")
    yield server, out
    server.stop()


def _expected(out, pairs) -> list[float]:
    model, tok = load_reward_model(out)
    rows = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                               add_generation_prompt=False), add_special_tokens=False)
            for q, a in pairs]
    return model.score_ids(rows).tolist()


def test_score_gives_the_reward_models_scores(reward_server):
    server, out = reward_server
    answers = ["2 plus 3 is 5.", "I do not know what 2 plus 3 is."]
    r = httpx.post(f"{server.base_url}/score", headers=server.headers, timeout=30,
                   json={"model": "rm", "text_1": "What is 2 plus 3?", "text_2": answers})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "rm" and body["usage"]["prompt_tokens"] > 0
    assert [d["index"] for d in body["data"]] == [0, 1] and all(d["object"] == "score" for d in body["data"])
    expected = _expected(out, [("What is 2 plus 3?", a) for a in answers])
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
    pairwise = httpx.post(f"{server.base_url}/v1/score", headers=server.headers, timeout=30, json={
        "text_1": ["What is 1 plus 1?", "What is 2 plus 3?"], "text_2": ["1 plus 1 is 2.", answers[1]]}).json()
    assert pairwise["data"][1]["score"] == pytest.approx(expected[1], abs=1e-5)
    models = httpx.get(f"{server.base_url}/v1/models", headers=server.headers).json()
    assert [m["id"] for m in models["data"]] == ["rm"]


@pytest.mark.parametrize("body,status,param", [
    ({"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, 400, "text_2"),
    ({"text_1": "a", "text_2": []}, 400, "text_2"),
    ({"text_1": "a"}, 400, None),
    ({"model": "other", "text_1": "a", "text_2": "b"}, 404, "model"),
])
def test_bad_score_requests_get_api_errors(reward_server, body, status, param):
    server, _ = reward_server
    r = httpx.post(f"{server.base_url}/score", headers=server.headers, timeout=30, json=body)
    assert r.status_code == status, r.text
    assert "message" in r.json()["error"] and (param is None or r.json()["error"]["param"] == param)
    assert httpx.post(f"{server.base_url}/score", timeout=30, json={"text_1": "a", "text_2": "b"}).status_code == 401
