"""The memory as a torch module: drop it after any backbone.

The trainable query projection lives here, in the trainer's model; the memory
(embedded or remote) holds keys, values and ages. The loss is computed locally
from the neighbour keys the memory returns, so its gradient flows into the
projection and the backbone, wherever the memory runs.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from lifelong_memory.client.store import MemoryClient, Store
from lifelong_memory.server.errors import AlreadyExists, MemoryServiceError
from lifelong_memory.server.memory import QueryResult, softmax_temperature


@dataclasses.dataclass
class MemoryOutput:
    predictions: torch.Tensor  # int64 [B]: value of the nearest slot (-1 if empty), read before the update
    loss: torch.Tensor | None  # scalar memory loss (with labels), differentiable in the input
    query: torch.Tensor  # float32 [B, D]: the normalised query sent to the memory
    result: QueryResult  # everything the memory returned
    neighbor_values: torch.Tensor | None = None  # int64 [B, k] (return_neighbors)
    neighbor_weights: torch.Tensor | None = None  # float32 [B, k] softmax weights, differentiable


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's l2_normalize, as the reference: x * rsqrt(max(sum(x^2), 1e-12))."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=1e-12))


class MemoryModule(nn.Module):
    """Query projection + memory lookup + memory loss.

    ``memory`` is a MemoryClient, or a Store plus ``name`` (and MemoryConfig
    fields in ``create``) to create or reuse a memory of that name; ``writer``
    tags the slots this module's updates write (see Store.memory).
    """

    def __init__(
        self,
        memory: MemoryClient | Store,
        key_dim: int,
        input_dim: int | None = None,
        *,
        name: str | None = None,
        use_recent: bool = True,
        return_neighbors: bool = False,
        writer: str = "",
        **create,
    ):
        super().__init__()
        if isinstance(memory, Store):
            if name is None:
                raise ValueError("give name= with a Store")
            memory = _memory_of(memory, name, writer, key_dim=key_dim, **create)
        elif create or name is not None or writer:
            raise ValueError("name=, writer= and memory config go with a Store; a MemoryClient has its own writer")
        if memory.config.key_dim != key_dim:
            raise ValueError(f"memory {memory.name!r} has key_dim {memory.config.key_dim}, not {key_dim}")
        self.memory = memory
        self._stream = None
        self.alpha = memory.config.alpha
        self.use_recent = use_recent
        self.return_neighbors = return_neighbors
        self.query_proj = nn.Parameter(torch.empty(input_dim or key_dim, key_dim))
        nn.init.trunc_normal_(self.query_proj, std=0.01, a=-0.02, b=0.02)

    def __deepcopy__(self, memo) -> MemoryModule:
        """A copy for evaluation or an average of the weights (EMA): its own parameters, the same memory (the
        memory is what the models share, not a weight) and a stream of its own, opened at its first call."""
        copied = MemoryModule.__new__(MemoryModule)
        memo[id(self)] = copied
        state = {key: value for key, value in self.__dict__.items() if key not in ("memory", "_stream")}
        copied.__dict__.update(copy.deepcopy(state, memo))
        copied.__dict__.update(memory=self.memory, _stream=None)
        return copied

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised query for ``x``, as sent to the memory: in float32 whatever the model's dtype
        (a bf16 or fp16 row misses unit length by more than the memory accepts), the gradient flowing
        back into ``x`` and the projection in their own dtypes."""
        return l2_normalize(x.float() @ self.query_proj.float())

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, update: bool | None = None) -> MemoryOutput:
        """Look ``x`` [B, input_dim] up; with labels also the loss, and (by default) the memory update."""
        update = labels is not None if update is None else update
        query = self.project(x)
        fields = set()
        if labels is not None:
            fields.add("positive_negative_keys")
        if self.return_neighbors:
            fields |= {"neighbors", "neighbor_keys"}
        if self._stream is None:  # one stream per module: a round trip per step, no per-call setup
            self._stream = self.memory.stream()
        try:
            result = self._stream.query(
                query.detach(), labels, update=update, use_recent=self.use_recent, fields=fields
            )
        except MemoryServiceError:
            self._stream.close()  # a failed call ends a gRPC stream; the next step opens a new one
            self._stream = None
            raise
        device = query.device
        output = MemoryOutput(result.predictions.to(device), None, query, result)
        if labels is not None:
            positive = (query * result.positive_keys.to(device)).sum(dim=1)
            negative = (query * result.negative_keys.to(device)).sum(dim=1)
            output.loss = (torch.relu(negative - positive + self.alpha) - self.alpha).mean()
        if self.return_neighbors:
            keys = result.neighbor_keys.to(device)
            similarities = torch.einsum("bd,bkd->bk", query, keys)
            temperature = softmax_temperature(keys.shape[1], self.alpha)
            output.neighbor_values = result.neighbor_values.to(device)
            output.neighbor_weights = torch.softmax(similarities * temperature, dim=1)
        return output


def _memory_of(store: Store, name: str, writer: str, **config) -> MemoryClient:
    """Memory ``name``, created with ``config`` unless it exists (or another trainer creates it first); one that
    exists must have the ``config`` given, but for ``seed``, which only seeds a new memory's age noise: a trainer
    joining a shared memory with its own seed joins it as it is."""
    try:
        if name not in {info.name for info in store.list_memories()}:
            return store.create_memory(name, writer=writer, **config)
    except AlreadyExists:  # created since the list: the two trainers started together
        pass
    memory = store.memory(name, writer=writer)
    given = dataclasses.replace(memory.config, **config).validated()  # as a create names them: cuda -> cuda:0
    differ = [
        f"{field} {getattr(memory.config, field)!r} (given {config[field]!r})"
        for field in config
        if field != "seed" and getattr(given, field) != getattr(memory.config, field)
    ]
    if differ:
        raise ValueError(f"memory {name!r} exists with " + ", ".join(differ) + ": give its config, or another name")
    return memory
