"""lm-evaluation-harness scores a multiple-choice task the same through the server as through transformers.

lm-eval's own `local-completions` client (token-id prompts, `echo: true`, `logprobs: 1`, `max_tokens: 1`; it
sums `token_logprobs[ctxlen:-1]` and checks each against `max(top_logprobs)`) runs against a real server on a tiny
random Llama, and lm-eval's `hf` model runs on the same checkpoint in transformers; every answer's log-likelihood,
its is-greedy flag and the task's accuracy must agree. The task and its data are written here: nothing is
downloaded."""
import json

import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("The quick brown fox jumps over the", [" lazy dog.", " red car.", " blue sky."], 0),
    ("Paged attention stores keys and values in", [" blocks.", " boxes.", " files.", " songs."], 0),
    ("Continuous batching lets new requests join", [" between steps.", " at noon."], 0),
    ("Hello,", [" world!", " moon!", " there!"], 0),
    ("def f(x): return x *", [" 2", " 3", " x"], 0),
    ("A small model for tests, trained in a", [" second.", " year.", " day.", " week."], 0),
    ("Question: which is a fruit? Answer:", [" apple", " brick"], 0),
    ("Question: 2 + 2 = ? Answer:", [" 3", " 4", " 5"], 1),
    ("The capital of France is", [" Berlin", " Paris", " Rome"], 1),
    ("Cats say", [" woof", " meow"], 1),
]


def _greedy_question(ckpt: str) -> tuple[str, list[str], int]:
    """A question whose right answer is the model's own greedy continuation, so that lm-eval's is-greedy flag is
    true for once: the first context and length (1-3 tokens) whose text re-encodes to the same tokens."""
    import torch
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for context, _, _ in QUESTIONS:
        ids = tokenizer.encode(context, add_special_tokens=False)
        greedy = []
        with torch.no_grad():
            for _ in range(3):
                greedy.append(int(model(torch.tensor([ids + greedy])).logits[0, -1].argmax()))
                text = tokenizer.decode(greedy)
                if tokenizer.encode(context + text, add_special_tokens=False) == ids + greedy:
                    return context, [" zebra crossing", text], 1
    raise AssertionError("no greedy continuation of the contexts re-encodes to its own tokens")


def _task_dir(tmp_path, questions):
    """A local multiple-choice task `tokenmill_tiny_mc`: its YAML config and JSONL data under tmp_path."""
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # JSON is YAML: the data path is quoted whatever characters it has
    (tasks / "tiny_mc.yaml").write_text("\n".join([
        "task: tokenmill_tiny_mc",
        "output_type: multiple_choice",
        "dataset_path: json",
        f"dataset_kwargs: {json.dumps({'data_files': {'test': str(data)}})}",
        "test_split: test",
        'target_delimiter: ""',  # the choices carry their own leading space
        'doc_to_text: "{{question}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{answer}}"',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ]))
    return tasks


def _scores(lm_eval, task_manager, model: str, model_args: dict) -> tuple[float, dict[tuple[int, int], tuple]]:
    """(accuracy, {(doc id, choice index): (log-likelihood, is_greedy)}) of one run."""
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tokenmill_tiny_mc"],
                                  task_manager=task_manager, batch_size=2, log_samples=True, bootstrap_iters=0)
    per_choice = {}
    for sample in out["samples"]["tokenmill_tiny_mc"]:
        for i, (ll, greedy) in enumerate(sample["filtered_resps"]):
            per_choice[(sample["doc_id"], i)] = (float(ll), bool(greedy))
    return out["results"]["tokenmill_tiny_mc"]["acc,none"], per_choice


def test_lm_eval_multiple_choice_matches_transformers(tiny_checkpoint, tmp_path, monkeypatch):
    import lm_eval  # here, not at the top: importing it (datasets, evaluate) costs seconds at collection
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    ckpt = str(tiny_checkpoint("llama"))
    questions = [*QUESTIONS, _greedy_question(ckpt)]
    task_manager = TaskManager(include_path=str(_task_dir(tmp_path, questions)), include_defaults=False)

    hf_acc, hf = _scores(lm_eval, task_manager, "hf", {"pretrained": ckpt, "dtype": "float32", "device": "cpu"})

    running = RunningServer(ckpt, "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
                            "--embedding-model", "none", "--max-model-len", "512")
    try:
        monkeypatch.setenv("OPENAI_API_KEY", running.api_key)
        api_acc, api = _scores(lm_eval, task_manager, "local-completions", {
            "base_url": f"{running.base_url}/v1/completions", "model": "tiny", "tokenizer_backend": "huggingface",
            "tokenizer": ckpt, "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
            "max_length": 512})
    finally:
        running.stop()

    assert len(hf) == sum(len(choices) for _, choices, _ in questions) and api.keys() == hf.keys()
    diffs = {key: abs(api[key][0] - hf[key][0]) for key in hf}
    print(f"acc hf {hf_acc} server {api_acc}; max |loglikelihood difference| {max(diffs.values()):.2e}")
    assert max(diffs.values()) < 1e-3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    assert hf[(len(QUESTIONS), 1)][1] and not hf[(len(QUESTIONS), 0)][1]  # the greedy answer and the other
    assert {key: api[key][1] for key in hf} == {key: hf[key][1] for key in hf}
    assert api_acc == hf_acc
