"""Distillation: the loss is Hinton's mix, a teacher with another vocabulary is refused, and a student trained
against the teacher tracks the teacher's distribution better than one trained on hard labels alone."""
import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TOY_CORPUS, TOY_MODEL
from training.distill import DistillSettings, distill, distill_loss


def test_loss_is_the_soft_kl_and_hard_cross_entropy_mix():
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(2, 3, 11), torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    hard = F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1))
    assert distill_loss(student, teacher, targets, 2.0, 0.0) == pytest.approx(float(hard))
    assert float(distill_loss(teacher, teacher, targets, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    p, q = F.softmax(teacher / 2, -1), F.log_softmax(student / 2, -1)
    kl = (p * (p.log() - q)).sum(-1).mean() * 4
    assert float(distill_loss(student, teacher, targets, 2.0, 1.0)) == pytest.approx(float(kl), rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(toy_pretrained_dir, smollm_gguf, tmp_path):
    with pytest.raises(ValueError, match="the student must use the teacher's tokenizer"):
        distill(DistillSettings(teacher=str(smollm_gguf), tokenizer=str(toy_pretrained_dir), data=TOY_CORPUS,
                                out_dir=str(tmp_path), **TOY_MODEL))


def test_distilled_student_gets_closer_to_the_teacher_than_hard_labels(toy_pretrained_dir, tmp_path):
    small = {**TOY_MODEL, "num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "max_steps": 30,
             "eval_every": 30}
    runs = {}
    for alpha in (0.0, 0.9):
        runs[alpha] = distill(DistillSettings(teacher=str(toy_pretrained_dir), tokenizer=str(toy_pretrained_dir),
                                              data=TOY_CORPUS, out_dir=str(tmp_path / str(alpha)), alpha=alpha,
                                              **small))
    from models.loading import load_model
    teacher = load_model(str(toy_pretrained_dir), "float32").model
    ids = torch.randint(5, 800, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = F.log_softmax(teacher.causal_logits(ids), -1)
        kl = {alpha: float(F.kl_div(F.log_softmax(load_model(str(out), "float32").model.causal_logits(ids), -1),
                                    target, log_target=True, reduction="batchmean")) for alpha, out in runs.items()}
    assert kl[0.9] < kl[0.0], kl
    header = json.loads((runs[0.9] / "log.jsonl").read_text().splitlines()[0])
    assert header["stage"] == "distill"
