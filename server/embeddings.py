"""OpenAI's /v1/embeddings, served by the sentence-embedding model (server/retrieval.py)."""
from fastapi import APIRouter, Depends, Request

from server.async_engine import AsyncEngine
from server.protocol import EmbeddingRequest, EmbeddingResponse
from server.state import ERRORS, authorized, ready, retrieval

router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(req: EmbeddingRequest, request: Request, _: AsyncEngine = Depends(ready)):
    return await retrieval(request).embeddings(req)
