"""Client library: one typed API for an embedded or remote lifelong memory."""

from lifelong_memory.client.memory_file import write_memory_file
from lifelong_memory.client.module import MemoryModule, MemoryOutput
from lifelong_memory.client.store import MemoryClient, MemoryInfo, Snapshot, Store, connect
from lifelong_memory.server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemoryServiceError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from lifelong_memory.server.memory import EMPTY, NO_SLOT, MemoryConfig, QueryResult, RetrainResult, UpdateResult

__all__ = [
    "EMPTY",
    "NO_SLOT",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "MemoryClient",
    "MemoryConfig",
    "MemoryInfo",
    "MemoryModule",
    "MemoryOutput",
    "MemoryServiceError",
    "NotFound",
    "PermissionDenied",
    "QueryResult",
    "ResourceExhausted",
    "RetrainResult",
    "Snapshot",
    "Store",
    "Unauthenticated",
    "Unavailable",
    "UpdateResult",
    "connect",
    "write_memory_file",
]
