"""Request and response bodies of the HTTP API (pydantic).

Static bounds live here; bounds that come from settings (prompt tokens, ``max_new_tokens``) are
checked by the routes and answered with the same 422 shape. Integers are strict: ``"10"``,
``3.5`` and ``true`` are not counts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from adapters_store.errors import StoreError
from adapters_store.ids import check_id

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_MESSAGES = 512
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each is a request of the batch)
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # samples per prompt; prompts x n is at most MAX_PROMPTS
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)


def _check_adapter_id(value: str) -> str:
    try:
        return check_id(value)  # the store's rule, and its message
    except StoreError as exc:
        raise ValueError(exc.message) from None


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


AdapterId = Annotated[str, Field(max_length=256), AfterValidator(_check_adapter_id)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
_STOP_STRING_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}
# One string is a list of one. The length cap sits on the list itself: on the union it would also
# be applied to ``null`` (a TypeError, i.e. a 500, for ``"stop": null``). The documented schema
# names all three forms.
StopField = Annotated[
    Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None,
    BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
    WithJsonSchema(
        {
            "anyOf": [
                _STOP_STRING_SCHEMA,
                {"type": "array", "items": _STOP_STRING_SCHEMA, "maxItems": MAX_STOP_STRINGS},
                {"type": "null"},
            ]
        }
    ),
    Field(description="a stop string or a list of them"),
]
Count = Annotated[int, Field(ge=1, strict=True)]
# Upper bound of query offsets/cursors: they go to SQLite, whose INTEGER is 64-bit signed (a larger
# Python int raises OverflowError there, i.e. a 500).
MAX_OFFSET = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]


class ErrorDetail(BaseModel):
    type: str
    message: str
    where: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------------ native /generate


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, Field(min_length=1, max_length=32)]
    content: str


class GenerateRequest(BaseModel):
    """Give ``prompt`` (raw text) or ``messages`` (the chat template is applied), not both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "The capital of France is", "adapter": None, "max_new_tokens": 16}]
        },
    )

    prompt: Annotated[str, AfterValidator(_not_blank)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    adapter: AdapterId | None = Field(None, description="adapter id; null = the base model")
    max_new_tokens: int = Field(64, ge=0, strict=True, description="0 = score the prompt only")
    temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False, description="0 (or < 1e-5) = greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, strict=True, description="0 = off; at most the model's vocabulary size")
    seed: Seed | None = None
    stop: StopField = None
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int = Field(
        0,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        strict=True,
        description="alternatives per generated token (with logprobs)",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        strict=True,
        description="the prompt tokens' log-probabilities, with this many alternatives per position",
    )
    n: int = Field(
        1,
        ge=1,
        le=MAX_N,
        strict=True,
        description="independent samples of the prompt (sample j uses seed + j); listed in `choices`",
    )
    stream: bool = Field(False, strict=True, description="answer with Server-Sent Events")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TopTokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopTokenLogprob] | None = None


class PromptTokenLogprob(BaseModel):
    """The first prompt token has no log-probability (nothing precedes it): ``null``."""

    token_id: int
    token: str
    logprob: float | None
    top_logprobs: list[TopTokenLogprob] | None = None


class GenerateChoice(BaseModel):
    """One of the ``n`` samples."""

    index: int
    text: str
    finish_reason: Literal["stop", "length", "eos", "cancelled"]
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class GenerateResponse(BaseModel):
    """The top-level ``text``, ``finish_reason`` and ``logprobs`` are sample 0's; ``choices`` lists
    every sample (one with ``n = 1``). ``usage`` counts the prompt once and every sample's tokens."""

    text: str
    adapter: str | None
    adapter_version: int | None
    finish_reason: Literal["stop", "length", "eos", "cancelled"]
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[PromptTokenLogprob] | None = None
    choices: list[GenerateChoice]


# ------------------------------------------------------------------------------------ adapters


class AdapterInfo(BaseModel):
    adapter_id: str
    version: int
    family: str
    config: dict[str, Any]
    trainable_params: int
    nbytes: int
    sha256: str
    created_at: float = Field(description="Unix time of this version's upload")
    status: Literal["ready", "quarantined"]
    error: str | None = None
    residency: list[Literal["disk", "host", "device", "merged"]]
    pinned: bool = Field(False, description="never evicted from host or device memory once loaded")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    total: int
    offset: int
    limit: int


# ------------------------------------------------------------------------------ health / ready


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: str
    dtype: str = Field(description="the dtype the base model serves in (what --dtype auto picked)")
    device: str


# ------------------------------------------------------------------------ OpenAI-compatible /v1


def _unsupported_unless(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Unknown fields are ignored
    (clients send many optional ones); known ones we cannot honour are 422."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="default 1")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, strict=True, description="extension (vLLM): 0 = off")
    n: int | None = Field(None, ge=1, le=MAX_N, strict=True, description="independent samples (choices)")
    seed: Seed | None = None
    stop: StopField = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]],
            Field(max_length=MAX_LOGIT_BIAS),
        ]
        | None
    ) = Field(None, description="token id (a string) -> a bias in [-100, 100] added to its score")
    user: str | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, v):
        _unsupported_unless(v in (None, 0), "penalties are not supported (use 0 or leave out)")
        return v


TokenIds = Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1)]


class CompletionRequest(_OpenAIRequest):
    """``prompt``: a string, a list of strings, a list of token ids or a list of token-id lists;
    each prompt is one choice (``index`` = its position), all batched together. ``echo`` returns the
    prompt (and with ``logprobs`` its tokens' log-probabilities, the first ``null``) before the
    completion; ``max_tokens: 0`` scores without generating."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, Field(ge=0, strict=True)] | None = Field(
        None, description="default 16; 0 = score the prompt only (with echo)"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, strict=True, description="alternatives per token (plus the chosen)"
    )
    echo: bool = Field(False, strict=True)
    best_of: int | None = Field(None, ge=1, strict=True, description="only equal to n (nothing is ranked)")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        for text in [v] if isinstance(v, str) else v:
            if isinstance(text, str):
                _not_blank(text)
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        _unsupported_unless(v is None, "suffix is not supported")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[str, Field(min_length=1, max_length=32)]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_OpenAIRequest):
    messages: Annotated[list[OpenAIMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Count | None = Field(None, description="default: the server's cap")
    max_completion_tokens: Count | None = None
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, strict=True, description="alternatives per token (needs logprobs)"
    )
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        _unsupported_unless(not v, "tools are not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        _unsupported_unless(v is None or v.get("type") == "text", "only response_format text is supported")
        return v


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with ``echo`` the prompt's entries come first, and the first prompt
    token has no log-probability (``null``)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
