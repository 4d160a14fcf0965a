"""One sequence being generated: its tokens, its KV blocks and its state."""
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field equality: sequences are looked up in queues
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions this is
    prompt_token_ids: list[int]
    params: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache keys of its computed full blocks
    num_cached_tokens: int = 0  # tokens whose K/V are already written to the cache
    num_scheduled_tokens: int = 0  # tokens the current step computes (a prefill chunk, or 1 to decode)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, float]] | None = None
    # with params.prompt_logprobs, on the request's first sequence: one entry per prompt token (the first None),
    # filled by the prefill chunks as they run
    prompt_logprobs: list[dict[int, float] | None] | None = None
    generator: torch.Generator | None = None
    grammar: Any = None  # an xgrammar GrammarMatcher when the request constrains its output
    num_preemptions: int = 0
    lora_name: str | None = None  # the adapter it runs with (engine/lora.py); None: the base model
    lora_slot: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: its prompt must be computed, not taken from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
