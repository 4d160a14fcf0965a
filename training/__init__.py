"""Offline training jobs, one stage per module (tok_train, pretrain, ...), each writing a Hugging Face-layout
checkpoint that `tokenmill serve` and `transformers` load. Run them as `tokenmill train STAGE --config FILE`."""
