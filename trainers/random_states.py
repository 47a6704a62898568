"""The torch random states a checkpoint keeps, so that a resumed run draws what a straight run would."""

from __future__ import annotations

import torch


def torch_random_states() -> dict:
    """The CPU generator's state and, on a host with CUDA, each GPU's: dropout on a GPU draws from the device's
    own generator, which the CPU state does not cover."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_torch_random_states(state: dict) -> None:
    """The states ``torch_random_states`` put in a checkpoint's ``state``, for as many GPUs as both the saving
    and this machine have."""
    torch.set_rng_state(state["torch_rng"].cpu())
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state.get("cuda_rng", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
