"""What generate() and step() hand back, shaped as vLLM's RequestOutput / CompletionOutput."""
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    logprobs: list[dict[int, float]] | None = None  # per generated token: token id -> logprob
    tool_calls: list | None = None  # LLM.chat with tools: the text.tool_parser.ToolCall list parsed from text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_preemptions: int = 0
    arrival_time: float = 0.0  # time.monotonic() when the request was added
    first_scheduled_time: float | None = None  # when its prefill first ran (queue time = this - arrival_time)
    error: str | None = None  # set when serving this request raised; it is finished and its blocks are freed
    # with SamplingParams.prompt_logprobs, once the prompt is computed: per prompt token (the first None), its id
    # and the top alternatives -> logprob
    prompt_logprobs: list[dict[int, float] | None] | None = None
