"""Stage `distill`: a small student trained from scratch on the same packed text as `pretrain`, but against a
teacher's token distributions: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy,
both at every position (Hinton et al.'s recipe; T^2 keeps the soft term's gradient scale independent of T).
The student uses the teacher's tokenizer, so their vocabularies line up."""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.loading import load_model
from text.tokenizer import Tokenizer
from training.pretrain import PretrainSettings, pretrain


@dataclass
class DistillSettings(PretrainSettings):
    teacher: str = "out/pretrain"  # the teacher checkpoint; `tokenizer` must be its tokenizer
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha goes to the hard labels
    out_dir: str = "out/distill"


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                 alpha: float) -> torch.Tensor:
    vocab = student.shape[-1]
    student, teacher = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    soft = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    hard = F.cross_entropy(student, targets.reshape(-1))
    return alpha * soft + (1 - alpha) * hard


def distill(s: DistillSettings) -> Path:
    if not 0 <= s.alpha <= 1 or s.temperature <= 0:
        raise ValueError(f"settings alpha ({s.alpha}) must be in [0, 1] and temperature ({s.temperature}) > 0")
    teacher = load_model(s.teacher, "float32", "cpu").model.eval()
    vocab = Tokenizer.from_dir(s.tokenizer).vocab_size
    if vocab != teacher.config.vocab_size:
        raise ValueError(f"tokenizer {s.tokenizer} has {vocab} tokens but the teacher {s.teacher} has a vocabulary "
                         f"of {teacher.config.vocab_size}: the student must use the teacher's tokenizer")

    def batch_loss(forward, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher.causal_logits(inputs)
        return distill_loss(forward(inputs), teacher_logits, targets, s.temperature, s.alpha)

    return pretrain(s, batch_loss, stage="distill")
