"""What the app does before any model is loaded: CORS for --allowed-origins, and the stored-response store of
/v1/responses (bounded, the oldest evicted first)."""
import pytest
from fastapi.testclient import TestClient

from engine.config import EngineConfig
from server.api import ServerSettings, create_app
from server.errors import APIError
from server.responses import _Store


def test_cors_allows_only_the_allowed_origins():
    app = create_app(ServerSettings(EngineConfig(model="unused"), allowed_origins=["http://ui.example"]))
    client = TestClient(app)  # not entered: no lifespan, so no model is loaded
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = client.options("/v1/chat/completions", headers={"Origin": "http://ui.example", **ask})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ui.example"
    other = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
    assert "access-control-allow-origin" not in other.headers
    closed = TestClient(create_app(ServerSettings(EngineConfig(model="unused"))))
    none = closed.options("/v1/chat/completions", headers={"Origin": "http://ui.example", **ask})
    assert "access-control-allow-origin" not in none.headers


def test_stored_responses_are_bounded_and_evicted_oldest_first():
    store = _Store(capacity=2)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [{"type": "message", "role": "user", "content": str(i)}])
    with pytest.raises(APIError) as missing:
        store.get("resp_0", "previous_response_id")
    assert missing.value.status == 404 and missing.value.param == "previous_response_id"
    assert store.get("resp_2")[1][0]["content"] == "2" and len(store.entries) == 2
