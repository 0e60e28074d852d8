"""Request and response bodies of the HTTP API, with their bounds.

The bounds come from the run config's `serve` section, so the models are built per app by
`build_schemas(limits)`; FastAPI then validates every body against them and the OpenAPI
document shows the real limits. Any violation is a 4xx naming the field (serve/app.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class Limits:
    """What one request may carry (pipelines/config/run.py ServeConfig documents each)."""

    max_candidates: int = 16
    max_messages: int = 64
    max_chars: int = 100_000
    max_tokens: int = 512


class _Body(BaseModel):
    # Unknown keys are refused, so a misspelled field is an error rather than a default.
    model_config = ConfigDict(extra="forbid")


class ScoreResponse(BaseModel):
    """One score per candidate, in order; higher is better. Scales differ by backend."""

    scores: list[float]
    backend: str


class RewriteResponse(BaseModel):
    """The revised answer; `finish_reason` "length" means it hit the token limit."""

    rewrite: str
    finish_reason: str
    context_truncated: int
    """Oldest context turns dropped to fit the model's window."""


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    """OpenAI `chat.completion`, plus `persona_id`: which serving persona conditioned the
    answer (None: the user is unknown; the persona text itself is never returned),
    `conversation_id` (the request's, or a new one) and the `policy_version` that answered."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    persona_id: str | None
    conversation_id: str
    policy_version: str


class ChatDelta(BaseModel):
    """What a chunk adds; unset fields are left out, so the last delta is `{}` as OpenAI's."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatChunk(BaseModel):
    """OpenAI `chat.completion.chunk` (one server-sent event of a streamed completion), with
    the same extra fields as `ChatResponse` on every chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None
    """Only on the last chunk, and only with `stream_options.include_usage`."""
    persona_id: str | None
    conversation_id: str
    policy_version: str


class ModelCard(BaseModel):
    """One served model in OpenAI's `model` object, plus the version of its weights."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhi"
    policy_version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class Schemas:
    """The request models of one app, bound to its limits."""

    Message: type[BaseModel]
    ScoreRequest: type[BaseModel]
    RewriteRequest: type[BaseModel]
    ChatRequest: type[BaseModel]


CONVERSATION_ID = r"^[A-Za-z0-9._:-]{1,128}$"
"""A conversation id: 1 to 128 letters, digits and `. _ : -` (it names rows and is logged)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    """A last chunk, with no choices, carries the token counts."""


def _ends_with_user_turn(messages: list) -> list:
    if messages and messages[-1].role != "user":
        raise ValueError("the last message must be the user's turn being answered")
    return messages


def build_schemas(limits: Limits) -> Schemas:
    """Request models whose field bounds are `limits`."""
    Text = Annotated[str, Field(max_length=limits.max_chars)]
    NonEmptyText = Annotated[str, Field(min_length=1, max_length=limits.max_chars)]

    class Message(_Body):
        """One chat turn."""

        role: Literal["system", "user", "assistant"]
        content: Text

    Messages = Annotated[list[Message], Field(min_length=1, max_length=limits.max_messages)]
    # Scores and completions answer the last user turn; without one there is nothing to answer.
    UserTurnLast = Annotated[Messages, AfterValidator(_ends_with_user_turn)]

    class ScoreRequest(_Body):
        """Score candidate replies to a conversation for one user."""

        persona: Text = Field(description='The user\'s persona; "" means none.')
        messages: UserTurnLast = Field(description="The conversation, ending with the user turn.")
        candidates: Annotated[list[NonEmptyText],
                              Field(min_length=1, max_length=limits.max_candidates)]

    class RewriteRequest(_Body):
        """Revise `answer` (the assistant's reply to `messages`) using the user's feedback."""

        persona: Text = Field(description='The user\'s persona; "" means none.')
        messages: Messages = Field(description="The conversation before the answer.")
        answer: NonEmptyText
        feedback: NonEmptyText = Field(description="The user's follow-up message.")

    MaxTokens = Annotated[int, Field(ge=1, le=limits.max_tokens)] | None

    class TextPart(BaseModel):
        """One part of an OpenAI message's content list; only text is understood."""

        model_config = ConfigDict(extra="ignore")
        type: Literal["text"]
        text: str

    class ChatMessage(BaseModel):
        """An OpenAI chat message: as `Message`, and also as OpenAI clients send one: a
        `name` (ignored), content as a list of text parts (joined), role `developer` (the
        newer name of `system`)."""

        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=limits.max_messages)]

        @field_validator("role")
        @classmethod
        def _system(cls, role: str) -> str:
            return "system" if role == "developer" else role

        @field_validator("content")
        @classmethod
        def _joined(cls, content: str | list[TextPart]) -> str:
            text = content if isinstance(content, str) else "\n".join(part.text for part in content)
            if len(text) > limits.max_chars:
                raise ValueError(f"the message's text is over {limits.max_chars} characters")
            return text

    ChatMessages = Annotated[list[ChatMessage], Field(min_length=1, max_length=limits.max_messages),
                             AfterValidator(_ends_with_user_turn)]

    class ChatRequest(BaseModel):
        """OpenAI chat completion request; `user` selects that user's serving persona and
        `conversation_id` (openai client: `extra_body`) groups turns into one conversation."""

        # OpenAI clients send fields this server ignores (e.g. `frequency_penalty`), so
        # extra keys are allowed here, unlike the project's own endpoints.
        model_config = ConfigDict(extra="ignore")
        model: Annotated[str, Field(max_length=256)] | None = None   # echoed in every streamed chunk
        messages: ChatMessages
        user: Annotated[str, Field(max_length=256)] | None = None
        max_tokens: MaxTokens = None
        max_completion_tokens: MaxTokens = Field(None, description="Newer name of max_tokens; "
                                                 "wins when both are given.")
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
        seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)] | None = None   # int64, as engines seed
        n: Literal[1] = 1
        stream: bool = False
        stream_options: StreamOptions | None = None
        conversation_id: Annotated[str, Field(pattern=CONVERSATION_ID)] | None = Field(
            None, description="Continue this conversation; omitted on a first turn, the "
                              "answer carries a new one to send with the next turn.")

    return Schemas(Message, ScoreRequest, RewriteRequest, ChatRequest)
