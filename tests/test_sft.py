"""SFT: labels cover exactly the assistant turns, bad conversations are refused by file and line, training lowers
the held-out assistant-token loss, and it starts from the default SmolLM2 GGUF as well as our own checkpoint."""
import json
import random

import pytest
import torch

from training.data import encode_conversation, read_conversations
from training.sft import SFTSettings, sft


def _arithmetic(path, n: int, seed: int):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n")
    return str(path)


def test_labels_cover_exactly_the_assistant_turns(smollm_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    ids, labels = encode_conversation(smollm_tokenizer, messages, 1000)
    learned = smollm_tokenizer.decode([t for t, label in zip(ids, labels) if label != -100], skip_special_tokens=False)
    assert learned == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    full = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == full


@pytest.mark.parametrize("line,words", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "assistant"}]}', "string fields"),
    ('{"messages": [', "not valid JSON"),
])
def test_bad_conversations_are_refused_naming_file_and_line(tmp_path, line, words):
    path = tmp_path / "chat.jsonl"
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(ValueError, match=f"chat.jsonl:3: .*{words}"):
        read_conversations([str(path)])


def test_sft_lowers_held_out_assistant_loss(toy_pretrained_dir, tmp_path):
    out = sft(SFTSettings(model=str(toy_pretrained_dir), data=[_arithmetic(tmp_path / "t.jsonl", 300, 0)],
                          val_data=[_arithmetic(tmp_path / "v.jsonl", 30, 1)], out_dir=str(tmp_path / "sft"),
                          max_steps=40, eval_every=40, batch_size=8, lr=3e-3, warmup_steps=5, progress=False))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[1]["step"] == 0 and val[-1] < 0.6 * val[0], val


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(toy_pretrained_dir, smollm_tokenizer, tmp_path):
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (mismatched / name).write_bytes((toy_pretrained_dir / name).read_bytes())
    smollm_tokenizer.save_pretrained(mismatched)
    with pytest.raises(ValueError, match="49152 tokens but the model's vocabulary holds 800"):
        sft(SFTSettings(model=str(mismatched), data=["unused.jsonl"], out_dir=str(tmp_path / "o"), progress=False))


@pytest.mark.slow
def test_sft_from_the_default_gguf_writes_a_checkpoint_transformers_and_we_load(smollm_gguf, tmp_path):
    import transformers

    from engine import LLM, SamplingParams
    out = sft(SFTSettings(model=str(smollm_gguf), data=[_arithmetic(tmp_path / "t.jsonl", 16, 0)],
                          out_dir=str(tmp_path / "sft"), max_steps=2, batch_size=2, max_len=64, progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    llm = LLM(str(out), dtype="float32", kv_cache_memory="64MiB", enforce_eager=True)  # no decode step here
    prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}])
    ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(llm.engine.runner.model.causal_logits(torch.tensor([ids]))[0, -1], expected,
                               rtol=1e-4, atol=1e-4)
    reply = llm.chat([{"role": "user", "content": "What is 2 plus 3?"}], SamplingParams(temperature=0, max_tokens=12),
                     use_tqdm=False)[0].outputs[0]
    assert reply.finish_reason in ("stop", "length") and reply.text
