"""Errors shared by the embedded memory, the server and the client.

Each error carries the name of a gRPC status code, so the server can return it
as that status and the client can raise the same class again on the other side.
"""


class MemoryServiceError(Exception):
    """Base class: ``code`` is the gRPC status code name."""

    code = "INTERNAL"


class InvalidArgument(MemoryServiceError, ValueError):
    """A request field is malformed; ``field`` names it."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MemoryServiceError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(MemoryServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MemoryServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(MemoryServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(MemoryServiceError):
    code = "UNAVAILABLE"


class Unauthenticated(MemoryServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MemoryServiceError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(MemoryServiceError):
    code = "DEADLINE_EXCEEDED"


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
    )
}
