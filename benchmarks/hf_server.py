"""Baseline server: Hugging Face transformers with static batching, behind the same streaming OpenAI API.

What a team without an inference engine would run: requests that arrive while a batch is decoding wait for the
whole batch to finish; the next batch takes up to --max-batch waiting requests, left-pads their prompts, and
decodes with transformers' KV cache until every member is done. Greedy at temperature 0, else plain sampling.

    .venv/bin/python benchmarks/hf_server.py [MODEL] --port 8001 [--dtype auto] [--max-batch 32]
"""
import argparse
import asyncio
import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class _Job:
    ids: list[int]
    max_tokens: int
    temperature: float
    ignore_eos: bool
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class StaticBatcher:
    def __init__(self, model, tokenizer, max_batch: int):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.inbox: queue.Queue[_Job] = queue.Queue()
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            batch = [self.inbox.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._generate(batch)
            except Exception as e:  # fail this batch, keep serving
                for job in batch:
                    job.send(e)

    @torch.inference_mode()
    def _generate(self, batch: list[_Job]) -> None:
        longest = max(len(j.ids) for j in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (longest - len(j.ids)) + j.ids for j in batch])
        mask = torch.tensor([[0] * (longest - len(j.ids)) + [1] * len(j.ids) for j in batch])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for _ in range(max(j.max_tokens for j in batch)):
            logits = out.logits[:, -1].float()
            tokens = logits.argmax(-1)
            for i, job in enumerate(batch):
                if job.temperature > 0:
                    tokens[i] = torch.multinomial(torch.softmax(logits[i] / job.temperature, -1), 1)[0]
                if not job.done:
                    self._emit(job, int(tokens[i]))
            if all(j.done for j in batch):
                return
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=out.past_key_values, use_cache=True)

    def _emit(self, job: _Job, token: int) -> None:
        job.generated.append(token)
        finish = None
        if token in self.eos and not job.ignore_eos:
            finish = "stop"
        elif len(job.generated) >= job.max_tokens:
            finish = "length"
        text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
        if finish is None and text.endswith("\ufffd"):
            text = job.text  # an incomplete character: wait for the rest of its bytes
        delta, job.text = text[len(job.text):], text
        job.done = finish is not None
        job.send((delta, finish, len(job.generated)))


def create_app(batcher: StaticBatcher, tokenizer, model_name: str):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="transformers static-batching baseline")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    async def handle(body: dict, chat: bool):
        if chat:
            ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        elif isinstance(body["prompt"], list):
            ids = list(body["prompt"])
        else:
            ids = tokenizer(body["prompt"])["input_ids"]
        job = _Job(ids, int(body.get("max_tokens") or 16), float(body.get("temperature") or 0.0),
                   bool(body.get("ignore_eos")), asyncio.Queue(), asyncio.get_running_loop())
        batcher.inbox.put(job)
        rid, created = f"hf-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str, finish: str | None) -> dict:
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {"content": delta}} if chat else {"text": delta})
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice]}

        async def events():
            text, finish, count = "", None, 0
            while finish is None:
                item = await job.out.get()
                if isinstance(item, Exception):
                    yield {"error": {"message": str(item), "type": "server_error"}}
                    return
                delta, finish, count = item
                text += delta
                yield chunk(delta, finish)
            yield {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [],
                   "usage": {"prompt_tokens": len(ids), "completion_tokens": count,
                             "total_tokens": len(ids) + count}}

        if body.get("stream"):
            async def sse():
                async for event in events():
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish, usage = "", None, None
        async for event in events():
            if "error" in event:
                return JSONResponse(event, status_code=500)
            for c in event["choices"]:
                text += c["delta"]["content"] if chat else c["text"]
                finish = c["finish_reason"] or finish
            usage = event.get("usage", usage)
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(await request.json(), chat=True)

    return app


def load(model: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loading import resolve_dtype, resolve_model_path
    path = resolve_model_path(model)
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    hf_model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kw).eval()
    return hf_model, tokenizer


def main() -> None:
    import uvicorn
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--served-model-name", default="transformers")
    args = p.parse_args()
    hf_model, tokenizer = load(args.model, args.dtype)
    app = create_app(StaticBatcher(hf_model, tokenizer, args.max_batch), tokenizer, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
