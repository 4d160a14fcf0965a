"""LLM: the offline entry point, as vLLM users know it (generate, chat)."""
import time
from dataclasses import replace
from itertools import count
from typing import Any

from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from text.tool_grammar import tool_call_structural_tag
from text.tool_parser import parse_tool_calls

Message = dict[str, Any]


class LLM:
    def __init__(self, model: str = "default", dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 256, kv_cache_memory: int | str | None = None,
                 num_kv_blocks: int | None = None, block_size: int = 16, **kwargs):
        self.engine = LLMEngine(EngineConfig(
            model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory, num_kv_blocks=num_kv_blocks, block_size=block_size, **kwargs))
        self._request_ids = count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """lora_request: an engine.lora.LoRARequest for every prompt, or a list of them (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), params, use_tqdm, lora_request)

    def chat(self, messages: list[Message] | list[list[Message]],
             params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             tool_choice: str | dict = "auto", parallel_tool_calls: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Chat as the server does it: with `tools`, each output's tool calls are parsed into `tool_calls`;
        tool_choice "required" or {"type": "function", "function": {"name": ...}} forces a valid call."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        if tool_choice == "none":
            tools = None
        texts = [tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tools=tools,
                                         **(chat_template_kwargs or {})) for conv in conversations]
        # the template already holds the special tokens it wants: encode without adding BOS again
        prompts = [(text, tok.encode(text, add_special_tokens=False)) for text in texts]
        if tools and tool_choice != "auto":
            named = None if tool_choice == "required" else tool_choice["function"]["name"]
            forced = StructuredOutputsParams(structural_tag=tool_call_structural_tag(tools, named, parallel_tool_calls))
            params = [replace(p, structured_outputs=forced) for p in self._params_list(params, len(prompts))]
        outputs = self._run(prompts, params, use_tqdm)
        if tools:
            for out in outputs:
                for o in out.outputs:
                    o.tool_calls = parse_tool_calls(o.text)[1]
        return outputs

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, list):
            if len(params) != count:
                raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
            return params
        return [params] * count

    def _run(self, prompts: list, params, use_tqdm: bool, lora_request=None) -> list[RequestOutput]:
        params = self._params_list(params, len(prompts))
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request: {len(loras)} given for {len(prompts)} prompts")
        ids = [f"offline-{next(self._request_ids)}" for _ in prompts]
        try:
            for request_id, prompt, p, lora in zip(ids, prompts, params, loras):
                if isinstance(prompt, tuple):  # (rendered text, its token ids), from chat()
                    self.engine.add_request(request_id, prompt[0], p, prompt_token_ids=prompt[1], lora_request=lora)
                else:
                    self.engine.add_request(request_id, prompt, p, lora_request=lora)
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                self.engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        generated: dict[str, int] = {}  # output tokens so far, per request
        bar = tqdm(total=len(prompts), desc="generate", disable=not use_tqdm, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    generated[out.request_id] = sum(len(o.token_ids) for o in out.outputs)
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    rate = sum(generated.values()) / (time.perf_counter() - start)
                    bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]
