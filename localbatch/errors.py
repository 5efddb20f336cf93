"""The one error type of the local server; the HTTP layer renders it in the envelope of
the face it is answered on (OpenAI's, or Anthropic's)."""

from __future__ import annotations


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
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No {kind} found with id '{object_id}'.", param="id")
