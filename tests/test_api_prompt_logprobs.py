"""Scoring through the completions API as lm-evaluation-harness does it: `echo` with `logprobs` returns every
prompt token's log-probability (the first null), `max_tokens: 0` scores without generating, and vLLM's
`prompt_logprobs` gives the same numbers. Each value must equal the log-softmax of transformers' logits on the
same weights, whether the prompt's blocks are in the prefix cache or not and across prefill chunks."""
import httpx
import pytest
import torch

from tests.conftest import RunningServer

PROMPT = list(range(3, 70))  # 67 tokens: five prefill chunks of 16, four full KV blocks of 16


@pytest.fixture(scope="module")
def scoring_server(tiny_checkpoint):
    running = RunningServer(str(tiny_checkpoint("llama")), "--served-model-name", "tiny", "--dtype", "float32",
                            "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--max-num-batched-tokens", "16",
                            "--enforce-eager", "--embedding-model", "none")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> torch.Tensor:
    """transformers' log-softmax over the prompt: row p is the distribution of token p + 1."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _complete(server: RunningServer, **fields) -> dict:
    response = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers, timeout=120,
                          json={"model": "tiny", "prompt": PROMPT, "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def _check_prompt_part(logprobs: dict, reference: torch.Tensor, top: int) -> None:
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    got = torch.tensor(logprobs["token_logprobs"][1:len(PROMPT)])
    want = reference[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for p in range(1, len(PROMPT)):
        assert len(logprobs["top_logprobs"][p]) >= min(top, 1)
        best = max(logprobs["top_logprobs"][p].values())
        assert abs(best - reference[p - 1].max().item()) < 1e-4


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "prefix-cached"])
def test_echo_with_logprobs_scores_every_prompt_token_as_transformers(scoring_server, reference, cached):
    if cached:  # the prompt's blocks are now in the prefix cache; the scoring request must compute them anyway
        _complete(scoring_server, max_tokens=1)
    one = _complete(scoring_server, echo=True, logprobs=1, max_tokens=1)
    assert len(one["logprobs"]["token_logprobs"]) == len(PROMPT) + 1  # prompt + the generated token
    _check_prompt_part(one["logprobs"], reference, 1)
    generated = one["logprobs"]["token_logprobs"][-1]
    assert abs(generated - reference[-1].max().item()) < 1e-4  # greedy: the top token of the last position

    zero = _complete(scoring_server, echo=True, logprobs=1, max_tokens=0)
    assert len(zero["logprobs"]["token_logprobs"]) == len(PROMPT) and zero["finish_reason"] == "length"
    _check_prompt_part(zero["logprobs"], reference, 1)
    assert zero["text"] == httpx.post(f"{scoring_server.base_url}/detokenize", headers=scoring_server.headers,
                                      json={"tokens": PROMPT}).json()["prompt"]


def test_vllm_prompt_logprobs_on_completions_and_chat(scoring_server, reference):
    choice = _complete(scoring_server, prompt_logprobs=3, max_tokens=1)
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        token = str(PROMPT[p])
        assert token in entries[p] and 3 <= len(entries[p]) <= 4
        assert abs(entries[p][token]["logprob"] - reference[p - 1, PROMPT[p]].item()) < 1e-4
    chat = httpx.post(f"{scoring_server.base_url}/v1/chat/completions", headers=scoring_server.headers, timeout=120,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "Hello, world!"}],
                            "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in chat["prompt_logprobs"][1:])


def test_streamed_echo_carries_the_prompt_logprobs_in_its_first_chunk(scoring_server):
    with httpx.stream("POST", f"{scoring_server.base_url}/v1/completions", headers=scoring_server.headers, timeout=120,
                      json={"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 3,
                            "temperature": 0, "stream": True}) as response:
        chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    import json
    bodies = [json.loads(c) for c in chunks[:-1]]
    streamed = [lp for b in bodies for lp in b["choices"][0]["logprobs"]["token_logprobs"]]
    whole = _complete(scoring_server, echo=True, logprobs=0, max_tokens=3)
    assert streamed == whole["logprobs"]["token_logprobs"] and len(streamed) == len(PROMPT) + 3
    assert "".join(b["choices"][0]["text"] for b in bodies) == whole["text"]
