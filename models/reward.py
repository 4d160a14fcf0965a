"""Reward models: a decoder with a scalar head read at each sequence's last token, as transformers'
`*ForSequenceClassification` with num_labels 1 (the layout `tokenmill train reward` writes and RL reads).

The score is read at the rightmost token that is not the pad token, transformers' rule, so a right-padded batch
and a lone sequence give the same score as `LlamaForSequenceClassification` on the same weights."""
import json
from pathlib import Path

import torch
from torch import nn

from models.config import ModelConfig
from models.hf_loader import hf_config, hf_weights
from models.llama import CausalBatch, LlamaForCausalLM
from text.tokenizer import Tokenizer

CLASSIFIER_SUFFIX = "ForSequenceClassification"


class RewardModel(nn.Module):
    def __init__(self, decoder: LlamaForCausalLM, pad_token_id: int):
        super().__init__()
        decoder.lm_head = None  # the vocabulary head is not used (nor saved); a tied one stays the embedding
        self.decoder = decoder
        self.config = decoder.config
        self.pad_token_id = pad_token_id
        self.score = nn.Linear(decoder.config.hidden_size, 1, bias=False)
        # as TRL starts a reward head: small, so the first scores are near 0
        nn.init.normal_(self.score.weight, std=1 / (decoder.config.hidden_size + 1) ** 0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B] (float32) of right-padded sequences [B, T]."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        hidden = self.decoder(input_ids.reshape(-1), positions, CausalBatch(batch, length)).view(batch, length, -1)
        index = torch.arange(length, device=input_ids.device)
        last = (index * (input_ids != self.pad_token_id)).argmax(-1)
        return self.score(hidden[torch.arange(batch, device=input_ids.device), last]).squeeze(-1).float()

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """Scores of token-id sequences of any lengths, in batches."""
        out = [self(right_padded(rows[i:i + batch_size], self.pad_token_id)) for i in range(0, len(rows), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def hf_config(self) -> dict:
        cfg = self.config.to_hf()
        return cfg | {"architectures": [self.config.architecture.replace("ForCausalLM", CLASSIFIER_SUFFIX)],
                      "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                      "pad_token_id": self.pad_token_id}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        weights = {k: v for k, v in self.decoder.hf_state_dict().items() if not k.startswith("lm_head")}
        return weights | {"score.weight": self.score.weight.detach()}


def right_padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Token-id rows of any lengths as one [B, T] tensor, right-padded with `pad`."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The pad id a reward model records: EOS, as TRL pads (our tokenizers have no pad token). A sequence that
    ends in EOS is then scored at the token before it, by transformers and by us alike."""
    return tokenizer.eos_token_id or 0


def is_reward_model(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return any(a.endswith(CLASSIFIER_SUFFIX) for a in json.loads(config.read_text()).get("architectures") or [])


def load_reward_model(path: str | Path) -> tuple[RewardModel, Tokenizer]:
    """A `*ForSequenceClassification` directory with one label, in float32 on the CPU."""
    path = Path(path)
    cfg = hf_config(path)
    archs = cfg.get("architectures") or []
    classifier = next((a for a in archs if a.endswith(CLASSIFIER_SUFFIX)), None)
    if classifier is None:
        raise ValueError(f"{path}: not a reward model (architectures {archs}; expected a *{CLASSIFIER_SUFFIX})")
    labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 1)
    if labels != 1:
        raise ValueError(f"{path}: a reward model has one label (a scalar score), this one has {labels}")
    config = ModelConfig.from_hf(cfg | {"architectures": [classifier.replace(CLASSIFIER_SUFFIX, "ForCausalLM")]})
    tokenizer = Tokenizer.from_dir(path)
    pad = cfg.get("pad_token_id")
    model = RewardModel(LlamaForCausalLM(config), pad if pad is not None else pad_token_id(tokenizer))
    weights = hf_weights(path)
    if "score.weight" not in weights:
        raise ValueError(f"{path}: checkpoint lacks score.weight")
    with torch.no_grad():
        model.score.weight.copy_(weights.pop("score.weight"))
    model.decoder.load_weights(weights)
    return model.eval(), tokenizer
