"""MemoryModule: the loss's gradient, and local vs remote giving the same training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lifelong_memory.client import InvalidArgument, MemoryModule, connect

KEY_DIM, INPUT_DIM, BATCH = 16, 12, 8


def fill(module: MemoryModule, steps: int = 10, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        module(torch.randn(BATCH, INPUT_DIM, generator=generator), torch.randint(0, 5, (BATCH,), generator=generator))


def test_loss_gradient_matches_finite_differences_and_the_formula(store):
    torch.manual_seed(0)
    module = MemoryModule(store, KEY_DIM, INPUT_DIM, name="grad", memory_size=64, choose_k=8, age_noise=0.0)
    with torch.no_grad():  # a larger projection so the hinge is active for most rows
        module.query_proj.mul_(100)
    fill(module)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, INPUT_DIM, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (BATCH,), generator=generator)

    out = module(x, labels, update=False)
    out.query.retain_grad()
    out.loss.backward()

    # d loss / d q = mean over rows of (K_neg - K_pos) where the hinge is active.
    q = out.query.detach()
    pos, neg = out.result.positive_keys, out.result.negative_keys
    active = ((q * neg).sum(1) - (q * pos).sum(1) + module.alpha > 0).float()
    assert active.sum() >= 2, "the test needs active hinges to mean anything"
    torch.testing.assert_close(out.query.grad, active[:, None] * (neg - pos) / BATCH, rtol=1e-5, atol=1e-7)

    # Central differences through the whole module (memory lookup included) along random directions;
    # float32 loss rounding gives the numeric side about 2e-5 of noise.
    slopes = []
    with torch.no_grad():
        for direction_seed in range(3):
            direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(direction_seed))
            eps = 1e-3
            plus = module(x + eps * direction, labels, update=False).loss
            minus = module(x - eps * direction, labels, update=False).loss
            numeric = float(plus - minus) / (2 * eps)
            analytic = float((x.grad * direction).sum())
            assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-4, (numeric, analytic)
            slopes.append(abs(analytic))
    assert max(slopes) > 1e-2
    assert module.query_proj.grad is not None and float(module.query_proj.grad.abs().sum()) > 0


def test_neighbor_weights_are_differentiable_softmax(store):
    torch.manual_seed(0)
    module = MemoryModule(store, KEY_DIM, INPUT_DIM, name="weights", memory_size=64, choose_k=8, return_neighbors=True)
    fill(module)
    x = torch.randn(BATCH, INPUT_DIM, requires_grad=True)
    out = module(x)
    assert out.loss is None
    assert out.neighbor_weights.shape == (BATCH, 8) and out.neighbor_values.shape == (BATCH, 8)
    torch.testing.assert_close(out.neighbor_weights.sum(1), torch.ones(BATCH))
    # Same numbers as the memory's own softmax weights, but with a gradient path.
    weights = module.memory.query(out.query.detach(), fields={"weights"}).weights
    torch.testing.assert_close(out.neighbor_weights.detach(), weights, rtol=1e-4, atol=1e-6)
    (out.neighbor_weights * torch.arange(8.0)).sum().backward()
    assert float(x.grad.abs().sum()) > 0


def test_neighbor_weights_are_the_same_local_and_remote(server_url):
    """The wire carries alpha as a float32, so a memory's config holds it in float32 precision in every mode: the
    softmax temperature ln(0.2 k) / alpha, and with it the weights, must not part in the last bit local and remote."""
    weights, served = [], []
    for url in ("local", server_url):
        torch.manual_seed(0)
        with connect(url) as store:
            module = MemoryModule(store, KEY_DIM, INPUT_DIM, name="weights-same", memory_size=64, choose_k=8,
                                  alpha=0.1, return_neighbors=True)  # fmt: skip
            fill(module)
            weights.append(module(torch.randn(BATCH, INPUT_DIM, generator=torch.Generator().manual_seed(1))))
            served.append(module.memory.query(weights[-1].query.detach(), fields={"weights"}).weights)
            store.delete_memory("weights-same")
    local, remote = weights
    assert torch.equal(served[0], served[1])  # the memory's own weights, too
    assert torch.equal(local.query, remote.query) and torch.equal(
        local.result.neighbor_keys, remote.result.neighbor_keys
    )
    assert torch.equal(local.neighbor_weights, remote.neighbor_weights)


def train_a_little(url: str) -> list[tuple[float, list[int]]]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(INPUT_DIM, 32), nn.ReLU(), nn.Linear(32, KEY_DIM))
    with connect(url) as store:
        module = MemoryModule(store, KEY_DIM, name="same", memory_size=128, choose_k=16, seed=5)
        optimizer = torch.optim.Adam(list(backbone.parameters()) + list(module.parameters()), lr=1e-2)
        generator = torch.Generator().manual_seed(2)
        history = []
        for _ in range(15):
            x = torch.randn(BATCH, INPUT_DIM, generator=generator)
            labels = torch.randint(0, 6, (BATCH,), generator=generator)
            out = module(backbone(x), labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            history.append((out.loss.item(), out.predictions.tolist()))
        store.delete_memory("same")
    return history


def test_local_and_remote_memory_train_identically(server_url):
    local, remote = train_a_little("local"), train_a_little(server_url)
    assert [p for _, p in local] == [p for _, p in remote]
    for (a, _), (b, _) in zip(local, remote, strict=True):
        assert abs(a - b) <= 1e-5
    assert len({p for _, ps in local for p in ps}) > 2, "predictions should be real labels, not all empty"


def test_a_failed_step_does_not_break_the_next(store):
    module = MemoryModule(store, KEY_DIM, INPUT_DIM, name="recover", memory_size=64, choose_k=8)
    fill(module, steps=2)
    with pytest.raises(InvalidArgument) as error:
        module(torch.randn(BATCH, INPUT_DIM), -torch.ones(BATCH, dtype=torch.long))
    assert error.value.field == "labels"
    out = module(torch.randn(BATCH, INPUT_DIM), torch.zeros(BATCH, dtype=torch.long))
    assert out.loss is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_trains_with_the_memory(store, dtype):
    """A bf16/fp16 backbone, and the module itself cast to that dtype: the query is projected and normalised
    in float32, so the memory takes it, and the gradients reach every parameter in the model's dtype."""
    torch.manual_seed(0)
    backbone = nn.Linear(INPUT_DIM, 32).to(dtype)
    module = MemoryModule(store, KEY_DIM, 32, name=f"low-{str(dtype)[6:]}", memory_size=64, choose_k=8).to(dtype)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(BATCH, INPUT_DIM, generator=generator).to(dtype)
        out = module(backbone(x), torch.randint(0, 5, (BATCH,), generator=generator))
        out.loss.backward()
    assert out.query.dtype == torch.float32
    torch.testing.assert_close(out.query.norm(dim=1), torch.ones(BATCH))
    assert module.query_proj.grad.dtype == dtype and backbone.weight.grad.dtype == dtype
    assert float(backbone.weight.grad.abs().sum()) > 0 and module.memory.info().stats["filled_slots"] > 0


def test_a_memory_that_exists_is_joined_only_with_its_own_config(store):
    first = MemoryModule(store, 8, name="joined", memory_size=64, choose_k=4, alpha=0.25, seed=1)
    again = MemoryModule(store, 8, name="joined", memory_size=64, choose_k=4, alpha=0.25, seed=7, device="cpu")
    assert again.memory.config == first.memory.config and again.alpha == 0.25, "a joining trainer's own seed is fine"
    refused = r"'joined' exists with memory_size 64 \(given 4096\), alpha 0.25 \(given 0.5\)"
    with pytest.raises(ValueError, match=refused):
        MemoryModule(store, 8, name="joined", memory_size=4096, choose_k=4, alpha=0.5)
    assert store.memory("joined").config == first.memory.config


def test_trainers_starting_together_on_a_new_memory_all_join_it(store, monkeypatch):
    """Each lists the memories, finds none, and creates it: all but the first find it created meanwhile."""
    store.create_memory("raced", key_dim=8, memory_size=64, choose_k=4)  # by the other trainer, after our list
    monkeypatch.setattr(type(store), "list_memories", lambda self: [])
    assert MemoryModule(store, 8, name="raced", memory_size=64, choose_k=4).memory.name == "raced"
    with pytest.raises(ValueError, match=r"exists with memory_size 64 \(given 128\)"):
        MemoryModule(store, 8, name="raced", memory_size=128, choose_k=4)


def test_a_deep_copy_has_its_own_weights_and_stream_and_the_same_memory(store):
    module = MemoryModule(store, KEY_DIM, INPUT_DIM, name="copied", memory_size=64, choose_k=4)
    model = nn.Sequential(nn.Linear(INPUT_DIM, INPUT_DIM), module)  # an EMA or evaluation copy of a whole model
    fill(module, steps=2)
    twin = copy.deepcopy(model)[1]
    assert twin.memory is module.memory and twin._stream is None and module._stream is not None
    assert torch.equal(twin.query_proj, module.query_proj) and twin.query_proj is not module.query_proj
    x = torch.randn(BATCH, INPUT_DIM, generator=torch.Generator().manual_seed(5))
    assert torch.equal(twin(x).predictions, module(x).predictions), "the same weights read the same memory"
    with torch.no_grad():
        twin.query_proj.mul_(2)
    assert not torch.equal(twin.query_proj, module.query_proj)
