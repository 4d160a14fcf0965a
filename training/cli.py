"""`tokenmill train STAGE [--config FILE] [key=value ...]`: one entry point for every training stage; under
`torchrun` the same command runs data-parallel."""
import argparse
import importlib

from training.settings import load_settings

# stage -> (module, settings class, function); imported on use, so `tokenmill serve` never loads training code
STAGES = {
    "data": ("training.data_prep", "DataSettings", "prepare"),
    "tokenizer": ("training.tok_train", "TokenizerSettings", "train_tokenizer"),
    "pretrain": ("training.pretrain", "PretrainSettings", "pretrain"),
    "sft": ("training.sft", "SFTSettings", "sft"),
    "dpo": ("training.dpo", "DPOSettings", "dpo"),
    "reward": ("training.reward", "RewardSettings", "reward"),
    "rl": ("training.rl", "RLSettings", "rl"),
    "lora": ("training.lora", "MergeSettings", "merge_adapter"),
    "distill": ("training.distill", "DistillSettings", "distill"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run a training stage: " + ", ".join(STAGES))
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", help="a TOML or JSON file of settings")
    p.add_argument("overrides", nargs="*", help="settings as key=value, after the config file's")


def run(args: argparse.Namespace) -> int:
    module, settings, function = STAGES[args.stage]
    stage = importlib.import_module(module)
    out = getattr(stage, function)(load_settings(getattr(stage, settings), args.config, args.overrides))
    print(f"wrote {out}")
    return 0
