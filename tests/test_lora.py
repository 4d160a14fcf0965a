"""LoRA: starts as the base model exactly, trains only its adapters, and merging (in place or from the saved
adapter) gives the same function as the adapted model."""
import pytest
import torch

from models.loading import load_model
from training.lora import LoRALinear, MergeSettings, add_lora, merge_adapter, merge_lora, save_adapter


def _logits(model, ids):
    with torch.no_grad():
        return model.causal_logits(ids)


def test_adapters_start_at_the_base_model_and_only_they_train(toy_pretrained_dir):
    model = load_model(str(toy_pretrained_dir), "float32").model
    ids = torch.randint(0, 800, (2, 12))
    before = _logits(model, ids)
    trainable = add_lora(model, rank=2, alpha=4.0, targets=["qkv_proj", "down_proj"])
    assert torch.equal(_logits(model, ids), before)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="lora_targets"):
        add_lora(load_model(str(toy_pretrained_dir), "float32").model, 2, 4.0, ["q_proj"])


def test_merged_weights_compute_what_the_adapters_did(toy_pretrained_dir, tmp_path):
    model = load_model(str(toy_pretrained_dir), "float32").model
    add_lora(model, rank=4, alpha=8.0, targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b, std=0.05)  # as if trained
    ids = torch.randint(0, 800, (2, 12))
    adapted = _logits(model, ids)
    save_adapter(model, tmp_path, 4, 8.0, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "toy")
    merged_dir = merge_adapter(MergeSettings(base=str(toy_pretrained_dir), adapter=str(tmp_path),
                                             out_dir=str(tmp_path / "merged")))
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-4, atol=1e-4)
    reloaded = load_model(str(merged_dir), "float32").model
    torch.testing.assert_close(_logits(reloaded, ids), adapted, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter"):
        merge_adapter(MergeSettings(base=str(toy_pretrained_dir), adapter=str(toy_pretrained_dir)))
