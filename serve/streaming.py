"""Server-sent events of a streamed chat completion (`stream: true`), in OpenAI's format.

The transformers engine generates a whole completion in one `generate` call and offers no
token stream through the engine protocol (actors/engines/base.py), so the answer is made
first and then cut here into word-sized pieces, one `chat.completion.chunk` each. A client
sees OpenAI's event sequence (the role, the content pieces, the finish reason, the usage
when asked, `data: [DONE]`); the first piece arrives when the whole answer is ready, not
earlier. The concatenated pieces are exactly the non-streamed text. A failing replica is
still a 5xx with a request id, since nothing has been sent when it fails.
"""
from __future__ import annotations

import re
from typing import Iterator

from serve.schemas import ChatChunk, ChatChunkChoice, ChatDelta, ChatUsage

DONE = "data: [DONE]\n\n"
_PIECE = re.compile(r"\S+\s*|\s+")


def pieces(text: str) -> list[str]:
    """`text` cut after each word's trailing whitespace; "".join(pieces(t)) == t."""
    return _PIECE.findall(text)


def sse(chunk: ChatChunk) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def chunk_events(template: ChatChunk, text: str, finish_reason: str,
                 usage: ChatUsage | None) -> Iterator[str]:
    """The events of one completion; `template` holds the fields every chunk repeats, and
    `usage` (None: not asked for) goes in a last chunk with no choices."""
    def chunk(delta: ChatDelta, finish: str | None = None) -> str:
        return sse(template.model_copy(update={"choices": [ChatChunkChoice(
            delta=delta, finish_reason=finish)]}))

    yield chunk(ChatDelta(role="assistant", content=""))
    for piece in pieces(text):
        yield chunk(ChatDelta(content=piece))
    yield chunk(ChatDelta(), finish_reason)
    if usage is not None:
        yield sse(template.model_copy(update={"choices": [], "usage": usage}))
    yield DONE
