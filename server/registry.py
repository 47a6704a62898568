"""Named memories: what the server owns, and what the embedded store owns in-process."""

from __future__ import annotations

import dataclasses
import re
import threading

from lifelong_memory.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from lifelong_memory.server.memory import Memory, MemoryConfig

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(MemoryConfig))


class MemoryRegistry:
    """Creates, finds, lists and deletes memories by name.

    ``defaults`` override MemoryConfig's defaults for fields a create request
    leaves unset (how ``lmem serve --backend faiss --shards 4`` applies).
    """

    def __init__(self, defaults: dict | None = None, max_memories: int = 64):
        defaults = dict(defaults or {})
        unknown = set(defaults) - CONFIG_FIELDS
        if unknown:
            raise ValueError(f"unknown memory config fields: {sorted(unknown)}")
        self.defaults = defaults
        self.max_memories = max_memories
        self._memories: dict[str, Memory] = {}
        self._lock = threading.Lock()

    def create(self, name: str, **config) -> Memory:
        check_name(name)
        unknown = set(config) - CONFIG_FIELDS
        if unknown:
            raise InvalidArgument("config", f"unknown fields {sorted(unknown)}")
        full = MemoryConfig(**{**self.defaults, **config}).validated()
        with self._lock:
            if name in self._memories:
                raise AlreadyExists(f"memory {name!r} already exists")
            if len(self._memories) >= self.max_memories:
                raise ResourceExhausted(f"this server holds at most {self.max_memories} memories")
            # Built under the lock so two creates of one name cannot both succeed.
            memory = Memory(full)
            self._memories[name] = memory
            return memory

    def get(self, name: str, field: str = "name") -> Memory:
        """The memory called ``name``; ``field`` is the request field that named it, for errors."""
        check_name(name, field)
        with self._lock:
            memory = self._memories.get(name)
        if memory is None:
            raise NotFound(f"memory {name!r} not found")
        return memory

    def list(self) -> list[tuple[str, Memory]]:
        with self._lock:
            return sorted(self._memories.items())

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            if self._memories.pop(name, None) is None:
                raise NotFound(f"memory {name!r} not found")


def check_name(name: str, field: str = "name") -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(field, f"must match {NAME_PATTERN.pattern}, got {name!r}")
