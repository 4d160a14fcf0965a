"""Shared fixtures: the default SmolLM2 GGUF, and small random checkpoints written by transformers."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 512
_TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Paged attention stores keys and values in blocks.",
    "Continuous batching lets new requests join between steps.", "Hello, world! 12345 67890",
    "def f(x):\n    return x * 2\n", "Über naïve café — 東京 😀", "A small model for tests, trained in a second.",
]


def _train_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_TEXT * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}",
    }))


def _hf_config(arch: str):
    import transformers
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128})
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32)
    raise ValueError(arch)


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch) -> directory of a random model saved by transformers' save_pretrained."""
    import transformers
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
            directory = tmp_path_factory.mktemp(f"tiny-{arch}")
            # llama is written in shards to exercise the safetensors index
            model.save_pretrained(directory, max_shard_size="200KB" if arch == "llama" else "1GB")
            _train_tokenizer(directory)
            made[arch] = directory
        return made[arch]

    return make


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from models.loading import resolve_model_path
    return resolve_model_path("default")


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_gguf):
    from models.tokenizer import Tokenizer
    return Tokenizer.from_gguf(smollm_gguf)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_gguf):
    """transformers' tokenizer read from the same GGUF (slow: several seconds)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
