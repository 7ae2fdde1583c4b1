"""The error shape of the OpenAI-compatible API: `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from pydantic import ValidationError


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 that names the field, e.g. `messages[0].name`."""
    err = exc.errors()[0]
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if err["type"] == "extra_forbidden":
        message = f"Unsupported field '{path}': pagedllm does not implement it"
    elif err["type"] == "missing":
        message = f"Missing required field '{path}'"
    else:
        reason = err["msg"].removeprefix("Value error, ")
        message = f"Invalid value for '{path}': {reason}" if path else reason
    return APIError(400, message, param=path or None)
