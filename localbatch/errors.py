"""The one error type of the local server; the HTTP layer renders it in the envelope of
the face it is answered on (OpenAI's, Anthropic's or Google's)."""

from __future__ import annotations

from typing import Any

# an HTTP status as Google's APIs name it in their errors
GOOGLE_STATUSES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                   404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED",
                   499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE",
                   504: "DEADLINE_EXCEEDED"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self, dialect: str = "openai") -> dict:
        """The error in the envelope of the face it is answered on."""
        if dialect == "anthropic":
            return {"type": "error", "error": {"type": self.type, "message": self.message}}
        if dialect == "gemini":
            return {"error": {"code": self.status, "message": self.message,
                              "status": GOOGLE_STATUSES.get(self.status, "UNKNOWN")}}
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No {kind} found with id '{object_id}'.", param="id")


async def json_body(request: Any) -> Any:
    """A request's JSON body; a 400 if it is not JSON."""
    try:
        return await request.json()
    except ValueError as exc:
        raise APIError(400, "The body is not valid JSON.",
                       type_="invalid_request_error") from exc
