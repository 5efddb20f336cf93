"""A cheap, deterministic token count for the local server's usage and enqueued-token limits.

The local server has no model and therefore no tokenizer to be faithful to: it counts
about four characters a token, plus OpenAI's per-message overhead, and a flat 85 tokens
for an image part (the `low` detail price). Good enough to exercise limits and accounting.
"""

from __future__ import annotations

import math
from typing import Any

IMAGE_TOKENS = 85
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def message_text(content: Any) -> str:
    """The text of a message's content (Chat Completions or Responses), whether a string
    or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)  # a wrong one is its request's 400
        )
    return ""


def embedding_inputs(value: Any) -> list[Any]:
    """The inputs of an embeddings request, as OpenAI reads its four forms: a string,
    an array of strings, an array of token ids (one input), an array of such arrays."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(
            isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [value]
    return value if isinstance(value, list) else []


def responses_input_text(body: dict[str, Any]) -> str:
    """The user's text of a Responses request: its `input`, a string or a list of items."""
    items = body.get("input")
    if isinstance(items, str):
        return items
    return " ".join(message_text(item.get("content")) for item in items or []
                    if isinstance(item, dict) and item.get("role", "user") == "user")


def image_parts(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]


def prompt_tokens(url: str, body: dict[str, Any]) -> int:
    """Prompt tokens of one request body for `url`."""
    if url.endswith("/responses"):
        return text_tokens(str(body.get("instructions") or "")) + \
            text_tokens(responses_input_text(body)) + TOKENS_PER_REPLY
    if url.endswith("/embeddings"):
        return sum(text_tokens(item) if isinstance(item, str) else
                   len(item) if isinstance(item, list) else 0
                   for item in embedding_inputs(body.get("input")))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return text_tokens(str(body.get("prompt") or body.get("input") or ""))
    total = TOKENS_PER_REPLY
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        total += TOKENS_PER_MESSAGE + text_tokens(message_text(content))
        total += IMAGE_TOKENS * len(image_parts(content))
    return total
