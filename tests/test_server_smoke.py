"""The real server answers the official openai client (a quick end-to-end check)."""
import pytest

pytestmark = pytest.mark.slow


def test_default_model_answers_the_france_question_with_paris(openai_client):
    reply = openai_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=30)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
