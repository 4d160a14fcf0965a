"""`tokenmill train STAGE [--config FILE] [key=value ...]`: one entry point for every training stage; under
`torchrun` the same command runs data-parallel."""
import argparse

from training.settings import load_settings

STAGES = ("data", "tokenizer", "pretrain", "sft", "dpo", "lora", "distill")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run a training stage: " + ", ".join(STAGES))
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", help="a TOML or JSON file of settings")
    p.add_argument("overrides", nargs="*", help="settings as key=value, after the config file's")


def run(args: argparse.Namespace) -> int:
    if args.stage == "data":
        from training.data_prep import DataSettings, prepare
        out = prepare(load_settings(DataSettings, args.config, args.overrides))
    elif args.stage == "tokenizer":
        from training.tok_train import TokenizerSettings, train_tokenizer
        out = train_tokenizer(load_settings(TokenizerSettings, args.config, args.overrides))
    elif args.stage == "pretrain":
        from training.pretrain import PretrainSettings, pretrain
        out = pretrain(load_settings(PretrainSettings, args.config, args.overrides))
    elif args.stage == "sft":
        from training.sft import SFTSettings, sft
        out = sft(load_settings(SFTSettings, args.config, args.overrides))
    elif args.stage == "dpo":
        from training.dpo import DPOSettings, dpo
        out = dpo(load_settings(DPOSettings, args.config, args.overrides))
    elif args.stage == "distill":
        from training.distill import DistillSettings, distill
        out = distill(load_settings(DistillSettings, args.config, args.overrides))
    else:
        from training.lora import MergeSettings, merge_adapter
        out = merge_adapter(load_settings(MergeSettings, args.config, args.overrides))
    print(f"wrote {out}")
    return 0
