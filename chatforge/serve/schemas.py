"""The server's settings and the API's shapes: requests and responses validated by pydantic (and
documented in /openapi.json from the same models), and errors in OpenAI's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatforge.chat_format import check_unicode
from chatforge.config import require_positive


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface; put HTTPS in front)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port, printed at start)"})
    api_key: list[str] = field(default_factory=list, metadata={"help": "accept these bearer keys: --api-key K1 K2 ... (none: no key needed)"})
    model_name: str = field(default="", metadata={"help": "the model's id in the API (empty: the name of the folder given)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    dtype: str = field(default="auto", metadata={
        "help": "weights' precision: auto (bf16 on a GPU that has it, fp32 elsewhere), float32, bfloat16"})
    max_batch: int = field(default=64, metadata={"help": "most sequences decoding together (a request with n samples takes n, one with num_beams beams that many)"})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting for room; more get 429"})
    max_tokens: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for"})
    max_n: int = field(default=8, metadata={"help": "largest n (answers per request)"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body; more gets 413"})

    def __post_init__(self):
        require_positive(self, "max_batch", "max_queue", "max_tokens", "max_n", "max_body_bytes")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


# --- requests and responses: validated by pydantic, documented in /openapi.json -------------------------

class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


def check_json_unicode(value: object, where: str = "body") -> None:
    """Every string and key of a JSON value is valid Unicode. JSON can carry a lone UTF-16 surrogate
    ("\\ud800"), which no tokenizer can encode, nor the JSON of an answer that quoted it back."""
    if isinstance(value, str):
        check_unicode(value, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_unicode(item, f"{where}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, f"a key in {where}")
            check_json_unicode(item, f"{key}" if where == "body" else f"{where}.{key}")


class SamplingRequest(BaseModel):
    """What both completion endpoints accept. Types are strict ("yes" is no boolean); unknown fields are
    ignored, as OpenAI's clients send some."""
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: object) -> object:
        check_json_unicode(data)  # in every field, the ignored ones too: refused alike, whatever the field
        return data

    model: str
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="default: whatever the context leaves")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end an answer (not included)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="reproducible sampling")
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_beams: int = Field(1, ge=1, description=(
        "beam search with this many beams (an extra field, as vLLM accepts): the answer is the most likely "
        "continuation found, and n (at most num_beams) answers are the n best beams; temperature, top_p and "
        "seed go unused, and with stream: true the answer comes in one burst when the search ends. "
        "Each beam takes a place in the server's batch (--max-batch). 1: sampling"))
    length_penalty: float = Field(1.0, allow_inf_nan=False, description=(
        "beam search ranks answers by total log-prob / length^length_penalty: 0 ranks by total log-prob, "
        "larger values favour longer answers"))


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="text to continue; a list gives one choice per prompt")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(CompletionResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TextCompletion(CompletionResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "loading"]


# What a client is told when the model did not load: the reason (paths, library errors) goes to the log only.
LOAD_FAILED = "the model failed to load; the server's log says why"


class ApiError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, ErrorBody(message=message, type=type, code=code, param=param), headers


