"""The server's size limits on what the web routes accept (`ServeSettings`), as HTTP refusals."""

from __future__ import annotations

from fastapi import HTTPException

from dialoop.settings import ServeSettings


def check_text(text: str, what: str, limits: ServeSettings) -> None:
    """413 when `text` (a message, a turn, a system prompt) is longer than the server accepts."""
    if len(text) > limits.max_message_chars:
        raise HTTPException(
            413, f"the {what} has {len(text)} characters; the limit is {limits.max_message_chars}"
        )


def check_max_tokens(max_tokens: int | None, limits: ServeSettings) -> None:
    """422 when a request asks for more new tokens than the server allows."""
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise HTTPException(422, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens_limit}")
