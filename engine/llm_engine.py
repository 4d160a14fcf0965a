"""LLMEngine: add_request / step / abort. One step = schedule -> run model -> sample -> detokenize -> emit."""
import logging
from dataclasses import dataclass
from itertools import count

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.malloc_tuning import keep_freed_memory_mapped
from engine.model_runner import ModelRunner, kv_cache_dtype
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative import SpeculativeConfig, Speculator
from engine.structured_output import Grammars
from kernels import for_dtype, get_backend
from engine.path_choice import PATHS, choose_path
from models.cpu_linear import use_cpu_linears
from models.loading import build_loaded, check_path, read_checkpoint
from models.moe import SparseMoE, moe_layers

logger = logging.getLogger(__name__)

_CPU_KV_BYTES = 2 * 2**30
_CUDA_MEMORY_FRACTION = 0.9
_CPU_CHUNK, _CUDA_CHUNK = 512, 2048  # default max_num_batched_tokens


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    error: str | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu":
            keep_freed_memory_mapped()
        backend = get_backend(config.attention_backend, device)  # before loading: a bad choice fails fast
        if config.quantization == "int4" and backend.name == "triton":
            # its float32 path hands on transposed views (models/cpu_linear.py), which the Triton ops do not take
            raise ValueError("quantization='int4' runs with the CPU backends ('cpu' or 'torch'), not 'triton'")
        check_path(config.dtype, config.quantization, device)  # a bad setting fails before any weight is read
        checkpoint = read_checkpoint(config.model, config.load_format)
        dtype, quantization = config.dtype, config.quantization
        if device.type == "cpu" and dtype == "auto" and quantization is None:
            self.path, _ = choose_path(checkpoint, backend)
            dtype, quantization = PATHS[self.path]
        else:
            self.path = quantization or str(check_path(dtype, quantization, device)).removeprefix("torch.")
        loaded = build_loaded(checkpoint, dtype, device, quantization)
        self.quantization = quantization
        self._weight_names: set[str] | None = None  # update_weights' expected names, found on its first call
        del checkpoint
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = set(loaded.config.eos_token_ids) | set(loaded.tokenizer.eos_token_ids)
        self.vocab_size = loaded.config.vocab_size
        dtype = next(loaded.model.parameters()).dtype
        backend = for_dtype(backend, dtype)
        if device.type == "cpu" and dtype == torch.float32 and backend.name != "triton":
            use_cpu_linears(loaded.model)  # faster small-batch products (models/cpu_linear.py)
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype, quantization, backend)
        num_blocks = self._num_blocks(config, device, self.kv_dtype)
        self.max_model_len = self._max_model_len(config, num_blocks)
        # the prefill chunk size: small on CPU, where a 512-token chunk already keeps the cores busy and
        # inter-token latency of the running streams stays within one chunk's time
        budget = config.max_num_batched_tokens or (_CUDA_CHUNK if device.type == "cuda" else _CPU_CHUNK)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, dtype, device, backend,
                                  config.max_num_seqs, self.max_model_len,
                                  config.enforce_eager or config.enable_lora, self.kv_dtype)
        self.lora = None
        if config.enable_lora:
            from engine.lora import LoRAManager
            self.lora = self.runner.lora = LoRAManager(loaded.model, config.max_loras, config.max_lora_rank, device)
        logger.info("kernels: %s; path: %s%s", backend.name, self.path,
                    "" if config.enforce_eager or self.runner.decode_step is None else
                    (", decode steps as CUDA graphs" if device.type == "cuda" else ", decode steps compiled"))
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids, self.grammars)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = count()
        self.speculator = None
        if config.speculative_config is not None:
            spec = SpeculativeConfig.from_dict(config.speculative_config)
            self.speculator = Speculator(self, spec, self._draft(spec))
        torch.manual_seed(config.seed)
        for layer in moe_layers(loaded.model):
            layer.expert_load.zero_()  # forget the warm-up and compile steps
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); max_model_len %d",
                    num_blocks, config.block_size, num_blocks * config.block_size,
                    self.runner.k_cache.nbytes * 2 / 2**20, str(self.kv_dtype).removeprefix("torch."),
                    self.max_model_len)

    def _num_blocks(self, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> int:
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        block_bytes = config.block_size * self.model_config.kv_bytes_per_token * dtype.itemsize
        budget = config.kv_cache_memory
        if budget is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * _CUDA_MEMORY_FRACTION)
            else:
                budget = _CPU_KV_BYTES
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory ({budget} bytes) holds no block of {block_bytes} bytes")
        return num_blocks

    def _max_model_len(self, config: EngineConfig, num_blocks: int) -> int:
        cfg = self.model_config
        capacity = num_blocks * config.block_size
        if config.max_model_len is not None:
            if config.max_model_len > cfg.max_position_embeddings:
                raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                                 f"max_position_embeddings ({cfg.max_position_embeddings})")
            if config.max_model_len > capacity:
                raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the KV cache capacity "
                                 f"({capacity} tokens): raise kv_cache_memory or num_kv_blocks")
            return config.max_model_len
        limit = min(cfg.max_position_embeddings, capacity)
        if cfg.sliding_window and cfg.sliding_window < limit:
            logger.warning("sliding-window attention is not implemented: max_model_len capped at the window (%d)",
                           cfg.sliding_window)
            limit = cfg.sliding_window
        return limit

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, lora_request=None) -> None:
        """Validate and queue a request: a text prompt, or token ids (with the text they came from, if known).

        Raises ValueError, leaving the engine untouched, on bad input."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if prompt_token_ids is not None:
            text, token_ids = prompt, list(prompt_token_ids)
        elif isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which must leave room for at least one generated token")
        params.validate_vocab(self.vocab_size)
        lora_slot = self._lora_slot(lora_request)
        matchers = self.grammars.matchers(params.structured_outputs, params.n)
        seqs, detoks = [], []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, index, list(token_ids), params)
            seq.grammar = matchers[index]
            if lora_request is not None:
                seq.lora_name, seq.lora_slot = lora_request.lora_name, lora_slot
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop_list,
                include_stop_str_in_output=params.include_stop_str_in_output))
        self.requests[request_id] = _Request(request_id, text, list(token_ids), seqs, detoks)
        for seq in seqs:
            self.scheduler.add(seq)

    def _lora_slot(self, lora_request) -> int:
        if lora_request is None:
            return 0
        if self.lora is None:
            raise ValueError("lora_request needs an engine with enable_lora=True")
        in_use = {seq.lora_name for r in self.requests.values() for seq in r.seqs if not seq.is_finished}
        return self.lora.slot(lora_request, in_use)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        self._forget(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    def expert_load(self) -> dict[int, list[int]]:
        """For a Mixture-of-Experts model: layer index -> (token, slot) pairs routed to each of its experts so far."""
        return {i: layer.mlp.expert_load.tolist() for i, layer in enumerate(self.runner.model.layers)
                if isinstance(layer.mlp, SparseMoE)}

    def update_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy new weights (transformers' names, all of them: a policy's hf_state_dict()) into the running model in
        place, for RL: the engine generates with the policy being trained, no checkpoint written. The prefix cache
        is dropped (its K/V came from the old weights). Only between requests, and for unquantized weights."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("update_weights while requests run: finish or abort them first")
        if self.quantization is not None:
            raise ValueError(f"update_weights needs unquantized weights; this engine runs {self.quantization}")
        model = self.runner.model
        if self._weight_names is None:
            tied = self.model_config.tie_word_embeddings
            self._weight_names = {k for k in model.hf_state_dict() if not (tied and k == "lm_head.weight")}
        missing = sorted(self._weight_names - set(weights))
        if missing:  # checked before anything is copied: a refused update leaves the old weights whole
            more = " …" if len(missing) > 5 else ""
            raise ValueError(f"update_weights lacks weights: {', '.join(missing[:5])}{more}")
        model.load_weights(weights)
        self.block_manager.reset_prefix_cache()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns an output for each request that advanced (finished ones last time).

        A request whose processing raises is finished with `error` set; the other requests go on."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        touched: dict[str, _Request] = {}
        if not is_prefill and self.speculator is not None and self.speculator.step(seqs, touched):
            return self._outputs(touched)
        for seq, token, logprobs in self._run_batch(seqs, is_prefill, touched):
            request = self.requests[seq.request_id]
            if request.error is not None:
                continue
            touched[request.request_id] = request
            try:
                self._advance(request, seq, token, logprobs)
            except Exception as e:
                self._fail(request, e, touched)
        return self._outputs(touched)

    def _outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        outputs = [self._output(r) for r in touched.values()]
        for out in outputs:
            if out.finished:
                self._forget(self.requests.pop(out.request_id))
        return outputs

    def _forget(self, request: _Request) -> None:
        if self.speculator is not None:
            for seq in request.seqs:
                self.speculator.forget(seq)

    def _draft(self, spec: SpeculativeConfig):
        if spec.method != "draft_model":
            return None
        from engine.draft_model import DraftModel
        return DraftModel(spec.model, self)

    def _run_batch(self, seqs: list[Sequence], is_prefill: bool, touched: dict[str, "_Request"]) -> list[tuple]:
        """(seq, token, logprobs) for each sequence. When the batch fails, each sequence is retried alone so that
        only the requests that fail by themselves are lost (rerunning a step rewrites the same KV slots)."""
        try:
            return self._forward(seqs, is_prefill)
        except Exception as e:
            if len(seqs) == 1:
                self._fail(self.requests[seqs[0].request_id], e, touched)
                return []
            logger.warning("a batch of %d sequences failed (%s); retrying them one by one", len(seqs), e)
        results = []
        for seq in seqs:
            request = self.requests[seq.request_id]
            if request.error is None:
                try:
                    results += self._forward([seq], is_prefill)
                except Exception as e:
                    self._fail(request, e, touched)
        return results

    def _forward(self, seqs: list[Sequence], is_prefill: bool) -> list[tuple]:
        """Run the model on the step's tokens, sample for the sequences whose last token it computed (a prefill
        chunk with more to come samples nothing), then commit the step to the scheduler."""
        logits = self.runner.run(seqs, is_prefill)
        for seq in seqs:
            if seq.seq_id in self.runner.prompt_logits:
                self._add_prompt_logprobs(seq, self.runner.prompt_logits[seq.seq_id])
        finishing = [i for i, seq in enumerate(seqs) if self.scheduler.will_sample(seq)]
        # a request with max_tokens 0 only computes its prompt: it finishes without a token
        done = [seqs[i] for i in finishing if seqs[i].params.max_tokens == 0]
        rows = [i for i in finishing if seqs[i].params.max_tokens != 0]
        ready = [seqs[i] for i in rows]
        sampled = self.sampler(logits[rows] if len(rows) < len(seqs) else logits, ready) if ready else None
        self.scheduler.commit(seqs)
        results = list(zip(ready, sampled.token_ids, sampled.logprobs)) if ready else []
        return results + [(seq, None, None) for seq in done]

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
        """Entries for the prompt tokens this chunk's logits predict (position p gives token p + 1), past those
        already known (a recomputed chunk after preemption adds nothing twice)."""
        start, prompt = seq.num_cached_tokens, seq.prompt_token_ids
        targets = prompt[start + 1:start + 1 + len(logits)]
        if not targets:
            return
        logprobs = torch.log_softmax(logits[:len(targets)], dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        top_lp, top_ids = (top_lp.tolist(), top_ids.tolist()) if k else ([], [])
        for j, token in enumerate(targets):
            if start + 1 + j != len(seq.prompt_logprobs):
                continue
            entry = dict(zip(top_ids[j], top_lp[j])) if k else {}
            entry[token] = chosen[j]
            seq.prompt_logprobs.append(entry)

    def _advance(self, request: _Request, seq: Sequence, token: int | None, logprobs) -> None:
        if token is None:  # max_tokens 0: the prompt is computed
            self.scheduler.finish(seq, "length")
            return
        if seq.grammar is not None and not seq.grammar.is_terminated() and not seq.grammar.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed")
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        detok = request.detokenizers[seq.index]
        detok.add(token)
        reason = self._finish_reason(seq, token, detok)
        if reason is not None:
            if detok.stop_reason is None:
                detok.flush()
            self.scheduler.finish(seq, reason)

    def _fail(self, request: _Request, error: Exception, touched: dict[str, _Request]) -> None:
        """Finish the request with `error` set; it is reported in this step's outputs."""
        logger.error("request %s failed: %s: %s", request.request_id, type(error).__name__, error)
        touched[request.request_id] = request
        request.error = f"{type(error).__name__}: {error}"
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")

    def _finish_reason(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> str | None:
        params = seq.params
        if detok.stop_reason is not None:
            seq.stop_reason = detok.stop_reason
            return "stop"
        if token in self.eos_token_ids and not params.ignore_eos:
            return "stop"
        if params.stop_token_ids and token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _prompt_logprobs(request: _Request) -> list | None:
        seq = request.seqs[0]
        if seq.prompt_logprobs is None or seq.wants_prompt_logprobs:
            return None
        return seq.prompt_logprobs

    def _output(self, request: _Request) -> RequestOutput:
        outputs = [CompletionOutput(index=seq.index, text=detok.text, token_ids=list(seq.output_token_ids),
                                    finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                    logprobs=seq.logprobs)
                   for seq, detok in zip(request.seqs, request.detokenizers)]
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=outputs,
                             finished=all(seq.is_finished for seq in request.seqs),
                             num_preemptions=sum(seq.num_preemptions for seq in request.seqs),
                             error=request.error, prompt_logprobs=self._prompt_logprobs(request),
                             arrival_time=request.seqs[0].arrival_time,
                             first_scheduled_time=min((s.first_scheduled_time for s in request.seqs
                                                       if s.first_scheduled_time is not None), default=None))
