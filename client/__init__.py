"""Client library: one typed API for an embedded or remote lifelong memory."""

from lifelong_memory.client.module import MemoryModule, MemoryOutput
from lifelong_memory.client.store import MemoryClient, MemoryInfo, Store, connect
from lifelong_memory.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MemoryServiceError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from lifelong_memory.server.memory import EMPTY, NO_SLOT, MemoryConfig, QueryResult, UpdateResult

__all__ = [
    "EMPTY",
    "NO_SLOT",
    "AlreadyExists",
    "FailedPrecondition",
    "InvalidArgument",
    "MemoryClient",
    "MemoryConfig",
    "MemoryInfo",
    "MemoryModule",
    "MemoryOutput",
    "MemoryServiceError",
    "NotFound",
    "QueryResult",
    "ResourceExhausted",
    "Store",
    "Unavailable",
    "UpdateResult",
    "connect",
]
