"""LoRA adapters at run time, with vLLM's routes and bodies: POST /v1/load_lora_adapter {"lora_name", "lora_path"}
and POST /v1/unload_lora_adapter {"lora_name"}. A loaded adapter is a model name: a request whose `model` names it
runs with it (state.check_model), and /v1/models lists it with its `parent`. Loading reads and checks the adapter
against the served model here; the engine puts it in a slot when a request first uses it."""
import asyncio
from itertools import count

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from engine import LLMEngine
from engine.lora import LoRARequest
from models.lora_adapter import load_adapter
from server.async_engine import AsyncEngine
from server.errors import APIError
from server.protocol import _Request
from server.state import ERRORS, ServerState, authorized, ready, state_of

router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)
_ids = count(1)


class LoadLoRARequest(_Request):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Request):
    lora_name: str
    lora_int_id: int | None = None


def register(state: ServerState, engine: LLMEngine, name: str, path: str) -> None:
    """Check the adapter against the served model and make `name` a model name; ValueError / FileNotFoundError
    naming the problem."""
    if engine.lora is None:
        raise ValueError("LoRA adapters need the server to run with --enable-lora")
    if name == state.settings.served_model_name or name in state.loras:
        raise ValueError(f"an adapter or model named {name!r} is already served")
    load_adapter(name, path, engine.runner.model, engine.config.max_lora_rank)
    state.loras[name] = LoRARequest(name, next(_ids), path)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoRARequest, request: Request, engine: AsyncEngine = Depends(ready)):
    try:
        await asyncio.to_thread(register, state_of(request), engine.engine, req.lora_name, req.lora_path)
    except FileNotFoundError as e:
        raise APIError(404, str(e), param="lora_path", code="not_found") from None
    except ValueError as e:
        raise APIError(400, str(e), param="lora_name" if "already" in str(e) else "lora_path",
                       code="invalid_value") from None
    return f"Success: LoRA adapter '{req.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(req: UnloadLoRARequest, request: Request, _: AsyncEngine = Depends(ready)):
    if state_of(request).loras.pop(req.lora_name, None) is None:
        raise APIError(404, f"no adapter named {req.lora_name!r} is loaded", param="lora_name", code="not_found")
    return f"Success: LoRA adapter '{req.lora_name}' removed successfully."
