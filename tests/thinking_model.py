"""A tiny Qwen3-shaped model with a thinking chat template, trained in a second to answer its two prompts with
`<think>...</think>` first: the thinking model of the reasoning tests (tests/conftest.py serves it once)."""
import json
from pathlib import Path

import torch

from tests.conftest import RunningServer, _hf_config, _train_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
            "{% endif %}")
ANSWERS = {"Hi": ("\nThe user says hi.\n", "Hello there!"),
           "Give JSON": ("\nA person, as JSON.\n", '{"name": "Al", "age": 3}')}


def serve_thinking_model(directory: Path) -> RunningServer:
    """Train the tiny thinker into `directory` and serve it (the caller stops the server)."""
    import transformers
    _train_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config("qwen3"))
    batch = []
    for question, (thought, answer) in ANSWERS.items():
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt + f"<think>{thought}</think>\n\n{answer}", add_special_tokens=False)["input_ids"]
        batch.append((len(tok(prompt, add_special_tokens=False)["input_ids"]), ids + [tok.eos_token_id]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):  # memorise both answers: the greedy continuation of each prompt
        loss = 0
        for start, ids in batch:
            logits = model(torch.tensor([ids])).logits[0, :-1]
            loss = loss + torch.nn.functional.cross_entropy(logits[start - 1:], torch.tensor(ids[start:]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return RunningServer(str(directory), "--served-model-name", "thinker", "--dtype", "float32",
                         "--enforce-eager", "--embedding-model", "none", "--max-model-len", "256")
