"""Shared fixtures: the default SmolLM2 GGUF, and small random checkpoints written by transformers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in its interpreter on CPU tensors; it must be on before any kernel is defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    # Mixture-of-Experts: top-2 / top-1 / top-4 / top-2, tied and untied, with and without a shared expert, dense
    # layers mixed in by decoder_sparse_step and by mlp_only_layers
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "mixtral-top1":
        return transformers.MixtralConfig(**{**common, "num_key_value_heads": 4}, num_local_experts=4,
                                          num_experts_per_tok=1, tie_word_embeddings=True)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=96, norm_topk_prob=False,
                                           decoder_sparse_step=2)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**{**common, "num_hidden_layers": 3}, head_dim=32, num_experts=8,
                                           num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                                           mlp_only_layers=[1])
    raise ValueError(arch)


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
TINY_MOE_ARCHS = ("mixtral", "mixtral-top1", "qwen2_moe", "qwen3_moe")


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


# ---- a tiny GGUF file, tiny_checkpoint("qwen2") written as llama.cpp's converter writes it -------------------------

# Hugging Face module -> GGUF tensor name part (llama.cpp's names, spelled out here rather than read from the loader)
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_tensor_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *module, suffix = hf_name.split(".")  # model.layers.N.self_attn.q_proj.weight
    return f"blk.{layer}.{_GGUF_LAYER_NAMES['.'.join(module)]}.{suffix}"


def _gguf_tensor_type(name: str):
    """Projections Q4_1, the token embedding Q8_0 (as SmolLM2's GGUF stores them), norms and biases F32."""
    from gguf import GGMLQuantizationType
    if name == "token_embd.weight":
        return GGMLQuantizationType.Q8_0
    if name.endswith(".weight") and "norm" not in name:
        return GGMLQuantizationType.Q4_1
    return GGMLQuantizationType.F32


def _add_gguf_tokenizer(writer, checkpoint: Path, vocab_size: int) -> None:
    """The directory's byte-level BPE as `tokenizer.ggml.*` metadata."""
    from gguf import TokenType
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    ids = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = sorted(ids, key=ids.get)
    assert [ids[t] for t in tokens] == list(range(len(tokens))), "token ids must be 0..n-1"
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    types = [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens]
    # llama.cpp pads the list to the embedding's rows with unused tokens
    padding = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]" for i in padding]
    types += [TokenType.UNUSED] * len(padding)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(ids[config["bos_token"]])
    writer.add_eos_token_id(ids[config["eos_token"]])
    writer.add_add_bos_token(config["add_bos_token"])
    writer.add_chat_template(config["chat_template"])


def write_tiny_gguf(checkpoint: Path, path: Path, f16_tensor: str | None = None) -> Path:
    """Write a qwen2 checkpoint directory as a GGUF file (types: _gguf_tensor_type; `f16_tensor`: one tensor stored
    as F16 instead). Its biases are zeros and its norms ones, which would leave both untested, so the file gets small
    random ones instead (the same in every file written)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from models.config import ModelConfig
    from models.hf_loader import hf_config
    cfg = ModelConfig.from_hf(hf_config(checkpoint))
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.tie_word_embeddings
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name(checkpoint.name)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    _add_gguf_tokenizer(writer, checkpoint, cfg.vocab_size)
    rng = np.random.default_rng(0)
    for hf_name, w in sorted(load_file(checkpoint / "model.safetensors").items()):
        name = _gguf_tensor_name(hf_name)
        if name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(w.shape, dtype=np.float32)
        elif "norm" in name:
            w = 1 + 0.1 * rng.standard_normal(w.shape, dtype=np.float32)
        kind = gguf.GGMLQuantizationType.F16 if name == f16_tensor else _gguf_tensor_type(name)
        add_gguf_tensor(writer, name, w, kind)
    return finish_gguf(writer, path)


def add_gguf_tensor(writer, name: str, w, kind) -> None:
    """w stored as `kind`: F32 / F16 as arrays, a block type quantized by the gguf package."""
    import gguf
    import numpy as np
    w = np.ascontiguousarray(w)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, w.astype(np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32))
    else:  # uint8 blocks [rows, bytes per row]: the writer derives the element shape from raw_dtype
        writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)


def finish_gguf(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    """tiny_checkpoint("qwen2") as a GGUF file: Q4_1 projections, a Q8_0 (tied) token embedding, F32 norms and
    biases, its tokenizer as gpt2 byte-level BPE metadata (write_tiny_gguf)."""
    return write_tiny_gguf(tiny_checkpoint("qwen2"), tmp_path_factory.mktemp("tiny-gguf") / "tiny-qwen2.gguf")


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from models.loading import resolve_model_path
    return resolve_model_path("default")


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_gguf):
    from text.tokenizer import Tokenizer
    return Tokenizer.from_gguf(smollm_gguf)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_gguf):
    """transformers' tokenizer read from the same GGUF (slow: several seconds)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


# ---- the real HTTP server -------------------------------------------------------------------------------------------

API_KEY = "test-key"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`tokenmill serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, *args: str, api_key: str | None = API_KEY, startup_timeout: float = 180.0):
        import subprocess
        import sys
        import time

        import httpx
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "server.cli", "serve", *args, "--port", str(self.port), "--log-level", "warning"]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenmill-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become healthy: {self.output()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self, timeout: float = 60.0) -> int:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# documents whose facts no model knows, for the retrieval tests
RAG_DOCS = {
    "rivers.md": "# Rivers of Zorbland\n\nThe Zorblat river is 412 kilometres long and floods every May.\n\n"
                 "## Delta\n\nIts delta holds three fishing towns: Orb, Quill and Sarn.\n",
    "mountains.rst": "Mountains\n=========\n\nMount Qel, the highest peak of Zorbland, is 5120 metres high.\n",
    "food.html": "<h1>Food</h1><p>The national dish of Zorbland is smoked eel with barley.</p>",
}


@pytest.fixture(scope="session")
def rag_index(tmp_path_factory) -> Path:
    """An index of RAG_DOCS built by `tokenmill rag index`."""
    docs = tmp_path_factory.mktemp("zorbland")
    for name, text in RAG_DOCS.items():
        (docs / name).write_text(text)
    out = tmp_path_factory.mktemp("index") / "zorb"
    run = subprocess.run([sys.executable, "-m", "server.cli", "rag", "index", str(docs), "--out", str(out),
                          "--max-tokens", "64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 chunks from 3 files (3 added" in run.stdout, run.stdout
    return out


@pytest.fixture(scope="session")
def server(rag_index):
    """The default SmolLM2 model served with an API key, embeddings and a rag index; shared by all server tests."""
    # the first start on a machine measures the CPU paths (~30 s on 2 cores). Eager: these tests check the API,
    # and compiling the 30-layer decode step costs 1-2 minutes per process; the default settings' compiled step
    # is checked in test_default_path.py
    running = RunningServer("default", "--served-model-name", "smollm2", "--max-model-len", "2048",
                            "--kv-cache-memory", "512MiB", "--rag-index", str(rag_index), "--enforce-eager",
                            startup_timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def thinking_server(tmp_path_factory):
    """tests/thinking_model.py's tiny thinking model, served (reasoning in chat, Responses and Messages)."""
    from tests.thinking_model import serve_thinking_model
    running = serve_thinking_model(tmp_path_factory.mktemp("tiny-thinker"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def openai_client(server):
    import openai
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=120)


# ---- training at toy size: the repository's own text is the corpus (in every checkout, nothing to download) ----
TOY_CORPUS = [str(ROOT / "README.md"), str(ROOT / "engine" / "*.py"), str(ROOT / "models" / "*.py"),
              str(ROOT / "text" / "*.py")]
TOY_MODEL = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, seq_len=64,
                 batch_size=4, warmup_steps=4, eval_every=1000, progress=False)


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory) -> Path:
    from training.tok_train import TokenizerSettings, train_tokenizer
    return train_tokenizer(TokenizerSettings(data=TOY_CORPUS, out_dir=str(tmp_path_factory.mktemp("tok")),
                                             vocab_size=800))


@pytest.fixture(scope="session")
def toy_pretrained_dir(toy_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer model pretrained for 40 steps on the toy corpus."""
    from training.pretrain import PretrainSettings, pretrain
    return pretrain(PretrainSettings(data=TOY_CORPUS, tokenizer=str(toy_tokenizer_dir), max_steps=40,
                                     out_dir=str(tmp_path_factory.mktemp("pretrained")), **TOY_MODEL))


def torchrun(stage: str, settings: dict, nproc: int = 2) -> None:
    """`tokenmill train STAGE key=value...` under torchrun with `nproc` CPU processes (gloo), one thread each."""
    overrides = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in {**settings, "threads": 1}.items()]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(nproc), "-m", "server.cli", "train", stage, *overrides], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
