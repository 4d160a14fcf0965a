"""Request and response bodies of Anthropic's Messages API (server/messages.py). The model reads text only: image
and document blocks are accepted here so that the error can name them (a 400 from the translation), not as a
tag pydantic does not know."""
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.protocol import _Request

logger = logging.getLogger(__name__)


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class ImageBlock(_Request):
    type: Literal["image"]


class DocumentBlock(_Request):
    type: Literal["document"]


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


def _as_blocks(content: Any) -> Any:
    """Text given as a string is one text block: then an error in a list of blocks names the block, not the
    string it might also have been."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: list[Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]] = []
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_block(cls, content: Any) -> Any:
        return _as_blocks(content)


class ThinkingBlock(_Request):
    """A thinking model's earlier reasoning, sent back by clients; it does not go into the prompt."""
    type: Literal["thinking"]
    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                         | RedactedThinkingBlock, Field(discriminator="type")]


class InputMessage(_Request):
    # "system" is not Anthropic's, but some clients send it; its text joins the system prompt
    role: Literal["user", "assistant", "system"]
    content: list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_block(cls, content: Any) -> Any:
        return _as_blocks(content)


class ToolDefinition(_Request):
    """A client tool (the model asks for a call; the client runs it)."""
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]  # a JSON schema; checked when the request is planned


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(_Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)  # accepted; the engine has no separate reasoning budget


def _server_tool(tool: Any) -> bool:
    return isinstance(tool, dict) and tool.get("type") not in (None, "custom")


class OutputFormat(_Request):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Request):
    effort: str | None = None  # accepted; there is one effort here
    format: OutputFormat | None = None  # the answer's text is JSON valid for this schema


class CountTokensRequest(_Request):
    """What decides the prompt; /v1/messages/count_tokens takes just this."""
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools_only(cls, tools: Any) -> Any:
        """Anthropic's server tools (web search, code execution, bash...) run on Anthropic's side; this server
        cannot run them, so they are left out of the prompt rather than refused."""
        if not isinstance(tools, list):
            return tools
        server = [t for t in tools if _server_tool(t)]
        if server:
            logger.warning("ignoring server tools this server cannot run: %s",
                           ", ".join(f"{t.get('name')} ({t.get('type')})" for t in server))
        return [t for t in tools if not _server_tool(t)]


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


# ---- responses (the documentation of what server/messages.py returns) ----

class ResponseText(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ResponseThinking(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # the model's reasoning is not signed here


class ResponseToolUse(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[ResponseThinking | ResponseText | ResponseToolUse, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use",
                         "model_context_window_exceeded"] | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
