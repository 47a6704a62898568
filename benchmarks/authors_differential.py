"""Differential test: the authors' TensorFlow Omniglot model against ours, step by step.

Both models start from the same weights (ours, converted to their layout), see the same episode
batches and are compared after every training step: the loss, the global gradient norm before
clipping, the predictions, every trainable weight, and the memory's keys, values and ages.

Their code (memory.py and model.py of tensorflow/models, research/learning_to_remember_rare_events)
is never part of this repository: point ``--authors-code`` at a folder holding it, and run this
script from an environment that has both tensorflow-cpu and this package, e.g.

    python3.11 -m venv /work/tf-venv
    /work/tf-venv/bin/pip install tensorflow-cpu six torch==2.13.0 -e '.[trainers]'
    OMP_NUM_THREADS=1 /work/tf-venv/bin/python benchmarks/authors_differential.py \\
        --authors-code /work/authors-code --data ../shared/data/omniglot --init authors --input raw

Their graph runs through ``tensorflow.compat.v1`` with v2 behaviour off; the few symbols TF 2 removed
(``tf.contrib.framework.get_or_create_global_step``) are supplied here, their files stay unchanged.

What is held equal so that the comparison can be exact:
- no dropout (keep_prob 1.0 in both; their training graph hard-codes 0.3) and no age noise (0 in
  both): random draws cannot be shared between the two frameworks;
- ``--label-offset 1`` (the default) shifts the labels to 1..80, so that their unwritten slots'
  value 0 never matches a label (our memory has a distinct empty marker instead). With
  ``--label-offset 0`` the run measures what that quirk of theirs changes;
- their write order among the oldest slots (``top_k(sorted=False)``) is unspecified, so memories
  are compared slot-permutation-invariantly: a written slot is named by (value, age), which is
  unique because a label occurs once per step;
- ``--adam`` picks our trainer's optimiser as its ``--adam`` does: ``torch`` (the trainer's default)
  or ``tensorflow`` (TensorFlow 1's epsilon placement, as theirs: trainers/omniglot.py TensorFlowAdam).

``--reference ours-one-ulp`` (no TensorFlow needed) compares ours with ours started one float32 step
away in every weight: how fast round-off alone separates two runs, the yardstick for the first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pathlib
import sys
import time
import types

import numpy as np
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.server.memory import EMPTY
from lifelong_memory.trainers import omniglot, omniglot_data

# Two kinds of divergence are told apart: a discrete outcome that differs (a prediction, which slots are
# written), and a continuous one beyond what float32 reduction order explains in one step. Round-off
# compounds over steps in both models alike, so the continuous figures are reported as they grow.
LOSS_TOLERANCE = 1e-5  # absolute (the loss lies in [-alpha, 1 + alpha])
WEIGHT_TOLERANCE = 1e-2  # distance between the two weight vectors over the distance ours moved from the start
KEY_TOLERANCE = 1e-4  # absolute, on unit keys


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-code", type=pathlib.Path, help="folder with their memory.py, model.py")
    parser.add_argument(
        "--reference",
        choices=("authors", "ours-one-ulp"),
        default="authors",
        help="what ours is compared with: the authors' code, or (a round-off control) ours with every "
        "initial weight moved by one float32 step",
    )
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path(omniglot.data))
    parser.add_argument("--init", choices=("authors", "he"), default="authors")
    parser.add_argument("--input", choices=omniglot_data.INPUTS, default="raw")
    parser.add_argument("--label-offset", type=int, choices=(0, 1), default=1)
    parser.add_argument("--adam", choices=("torch", "tensorflow"), default="torch")
    parser.add_argument("--episode-batches", type=int, default=3)
    parser.add_argument("--episode-length", type=int, default=omniglot.episode_length)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, help="write every step's figures here (JSON)")
    config = parser.parse_args()
    if config.reference == "authors" and config.authors_code is None:
        parser.error("--authors-code is required with --reference authors")
    return config


def import_authors_code(folder: pathlib.Path):
    """Their model module, imported against tf.compat.v1 (v2 behaviour off) under the name ``tensorflow``,
    and the list that collects the global gradient norm their training graph computes."""
    for name in ("memory.py", "model.py"):
        if not (folder / name).is_file():
            raise SystemExit(f"--authors-code {folder}: no {name} there")
    import tensorflow

    v1 = tensorflow.compat.v1
    v1.disable_v2_behavior()
    shim = types.ModuleType("tensorflow")
    shim.__dict__.update({name: getattr(v1, name) for name in dir(v1) if not name.startswith("__")})
    shim.contrib = types.SimpleNamespace(
        framework=types.SimpleNamespace(get_or_create_global_step=v1.train.get_or_create_global_step)
    )
    gradient_norms = []

    def clip_by_global_norm(tensors, clip_norm):  # theirs, keeping the norm it returns and they drop
        clipped, norm = v1.clip_by_global_norm(tensors, clip_norm)
        gradient_norms.append(norm)
        return clipped, norm

    shim.clip_by_global_norm = clip_by_global_norm
    sys.path.insert(0, str(folder))
    sys.modules["tensorflow"] = shim
    try:
        model = importlib.import_module("model")
    finally:
        sys.modules["tensorflow"] = tensorflow
        sys.path.remove(str(folder))
    return v1, model, gradient_norms


def authors_graph(v1, model, config: argparse.Namespace, vocab_size: int):
    """Their Model as train.py builds it, but with keep_prob 1.0, age noise 0, and the training predictions kept."""
    memory = model.memory

    class Reference(model.Model):
        def get_memory(self):
            return memory.Memory(
                self.rep_dim,
                self.memory_size,
                self.vocab_size,
                choose_k=omniglot.choose_k,
                alpha=omniglot.alpha,
                age_noise=0.0,
            )

        def train(self, x, y):
            loss, self.train_predictions = self.core_builder(x, y, keep_prob=1.0)
            return loss, self.training_ops(loss)

    reference = Reference(
        omniglot_data.IMAGE_SIZE**2,
        omniglot.episode_width,
        omniglot.rep_dim,
        omniglot.memory_size,
        vocab_size,
        learning_rate=omniglot.learning_rate,
    )
    reference.setup()
    session_config = v1.ConfigProto(
        intra_op_parallelism_threads=config.threads, inter_op_parallelism_threads=config.threads
    )
    session = v1.Session(config=session_config)
    session.run(v1.global_variables_initializer())
    return reference, session


def as_tensorflow_layout(encoder: torch.nn.Module, module: MemoryModule) -> dict[str, np.ndarray]:
    """Our weights under their variable names and in their layouts: conv OIHW -> HWIO; the linear layer's
    input order from our NCHW flatten to their NHWC flatten, transposed to [inputs, outputs]."""
    convolutions = [layer for layer in encoder.features if isinstance(layer, torch.nn.Conv2d)]
    linear = encoder.features[-1]
    weights = {}
    for name, layer in zip(("conv1", "conv1a", "conv2", "conv2a"), convolutions, strict=True):
        weights[f"core/{name}_w:0"] = layer.weight.detach().permute(2, 3, 1, 0).numpy()
        weights[f"core/{name}_b:0"] = layer.bias.detach().numpy()
    channels = convolutions[-1].out_channels
    side = math.isqrt(linear.in_features // channels)
    fc = linear.weight.detach().reshape(linear.out_features, channels, side, side).permute(2, 3, 1, 0)
    weights["core/fc1_w:0"] = fc.reshape(-1, linear.out_features).numpy()
    weights["core/fc1_b:0"] = linear.bias.detach().numpy()
    weights["memory_query_proj:0"] = module.query_proj.detach().numpy()
    return {name: value.copy() for name, value in weights.items()}


def written_slots(keys: np.ndarray, values: np.ndarray, ages: np.ndarray, written: np.ndarray) -> dict:
    """{(value, age): key} of the written slots: a name for each slot that does not depend on its index."""
    return {(int(v), float(a)): k for k, v, a in zip(keys[written], values[written], ages[written], strict=True)}


def compare_memories(reference: dict, ours: dict) -> dict:
    common = reference.keys() & ours.keys()
    key_difference = max((float(np.abs(reference[s] - ours[s]).max()) for s in common), default=0.0)
    return {
        "written": [len(reference), len(ours)],
        "slots_only_in_one": len(reference.keys() ^ ours.keys()),
        "key_max_abs": key_difference,
    }


def weight_distance(reference: dict, ours: dict, initial: dict) -> tuple[float, float | None, float | None]:
    """(max abs difference, |reference - ours| / |ours - initial|, |reference - initial| / |ours - initial|)
    over all trainable weights together; ``initial`` is ours. The ratios are None until ours has moved
    (the first step's gradient is 0: the memory is empty)."""
    names = sorted(initial)
    difference = np.concatenate([(reference[n] - ours[n]).ravel() for n in names])
    ours_moved = float(np.linalg.norm(np.concatenate([(ours[n] - initial[n]).ravel() for n in names])))
    reference_moved = float(np.linalg.norm(np.concatenate([(reference[n] - initial[n]).ravel() for n in names])))
    if ours_moved == 0:
        return float(np.abs(difference).max()), None, None
    return float(np.abs(difference).max()), float(np.linalg.norm(difference)) / ours_moved, reference_moved / ours_moved


@torch.no_grad()
def nearest_margins(encoder, module, images) -> np.ndarray:
    """Per row, the similarity of our nearest slot minus that of the second nearest, before this step."""
    queries = module.project(encoder(omniglot.on_device(encoder, images)))
    result = module.memory.query(queries, k=2, use_recent=False, fields=("neighbors",))
    similarities = result.neighbor_similarities
    return (similarities[:, 0] - similarities[:, 1]).numpy()


def true_max_deviations(out) -> int:
    """Rows whose positive or negative similarity is negative: where their masked maximum (which takes a
    masked-out 0 over a negative similarity) and our true maximum differ."""
    q = out.query.detach()
    positive = (q * out.result.positive_keys).sum(dim=1)
    negative = (q * out.result.negative_keys).sum(dim=1)
    return int(((positive < 0) | (negative < 0)).sum())


class Authors:
    """The reference side: their graph in a TensorFlow session, started from ``initial`` (our weights)."""

    def __init__(self, config: argparse.Namespace, initial: dict[str, np.ndarray], vocab_size: int):
        v1, model, gradient_norms = import_authors_code(config.authors_code)
        self.model, self.session = authors_graph(v1, model, config, vocab_size)
        self.variables = {v.name: v for v in v1.trainable_variables()}
        if self.variables.keys() != initial.keys():
            raise SystemExit(f"their trainable variables {sorted(self.variables)} are not {sorted(initial)}")
        for name, value in initial.items():
            self.variables[name].load(value, self.session)
        self.fetches = [self.model.loss, self.model.gradient_ops, self.model.train_predictions, gradient_norms[0]]

    def clear(self) -> None:
        self.model.clear_memory(self.session)

    def step(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, float]:
        """(loss, predictions, global gradient norm before clipping) of one training step."""
        feed = {self.model.x: images.reshape(len(images), -1), self.model.y: labels.astype(np.int32)}
        loss, _, predictions, norm = self.session.run(self.fetches, feed)
        return float(loss), predictions, float(norm)

    def weights(self) -> dict[str, np.ndarray]:
        return dict(zip(self.variables, self.session.run(list(self.variables.values())), strict=True))

    def memory(self) -> dict:
        keys, values, ages = self.session.run([self.model.mem_keys, self.model.mem_vals, self.model.mem_age])
        return written_slots(keys, values, ages, np.linalg.norm(keys, axis=1) > 0)


class Ours:
    """Our trainer's step (trainers/omniglot.py train_step) on an embedded memory; ``one_ulp`` moves every
    initial weight by one float32 step, as a control of what round-off alone does to the trajectory."""

    def __init__(self, store, name: str, config: argparse.Namespace, one_ulp: bool = False):
        torch.manual_seed(config.seed)
        self.encoder = omniglot.Encoder(omniglot.rep_dim, dropout_keep=1.0, init=config.init)
        self.module = MemoryModule(
            store,
            omniglot.rep_dim,
            name=name,
            memory_size=omniglot.memory_size,
            choose_k=omniglot.choose_k,
            alpha=omniglot.alpha,
            age_noise=0.0,
            seed=config.seed,
        )
        parameters = [*self.encoder.parameters(), *self.module.parameters()]
        if one_ulp:
            with torch.no_grad():
                for parameter in parameters:
                    parameter.copy_(torch.nextafter(parameter, torch.full_like(parameter, math.inf)))
        self.optimizer = omniglot.make_optimizer(parameters, config.adam, omniglot.learning_rate, omniglot.adam_epsilon)
        self.output = None

    def clear(self) -> None:
        self.module.memory.clear()
        self.encoder.train()

    def step(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, float]:
        self.output, norm = omniglot.train_step(
            self.encoder, self.module, self.optimizer, images, labels, omniglot.clip_norm
        )
        # Their unwritten slots hold 0, where ours hold EMPTY: the same prediction, an empty nearest slot.
        predictions = torch.where(self.output.predictions == EMPTY, 0, self.output.predictions).numpy()
        return self.output.loss.item(), predictions, norm

    def weights(self) -> dict[str, np.ndarray]:
        return as_tensorflow_layout(self.encoder, self.module)

    def memory(self) -> dict:
        keys, values, ages = (x.numpy() for x in self.module.memory.slots(range(omniglot.memory_size)))
        return written_slots(keys, values, ages, values != EMPTY)


def main() -> None:
    config = parse_arguments()
    torch.set_num_threads(config.threads)
    split = omniglot_data.load_split(config.data, "reference", config.input, progress=False)
    store = connect("local")
    ours = Ours(store, "differential", config)
    initial = ours.weights()
    if config.reference == "authors":
        vocab_size = omniglot.batch_episodes * omniglot.episode_width + config.label_offset
        reference = Authors(config, initial, vocab_size)
    else:
        reference = Ours(store, "differential-one-ulp", config, one_ulp=True)

    rng = np.random.default_rng(config.seed)
    steps, first_discrete, first_beyond_tolerance = [], None, None
    started = time.time()
    for batch in range(config.episode_batches):
        images, labels = omniglot_data.sample_episodes(
            split.train, omniglot.batch_episodes, omniglot.episode_width, config.episode_length, rng
        )
        labels = labels + config.label_offset
        reference.clear()
        ours.clear()
        for t in range(config.episode_length):
            reference_loss, reference_predictions, reference_norm = reference.step(images[t], labels[t])
            margins = nearest_margins(ours.encoder, ours.module, images[t])
            our_loss, our_predictions, our_norm = ours.step(images[t], labels[t])
            mismatches = reference_predictions != our_predictions
            weights_abs, weights_relative, movement_ratio = weight_distance(
                reference.weights(), ours.weights(), initial
            )
            memory = compare_memories(reference.memory(), ours.memory())
            step = {
                "episode_batch": batch,
                "step": t,
                "loss": [reference_loss, our_loss],
                "loss_abs": abs(reference_loss - our_loss),
                "gradient_norm": [reference_norm, our_norm],
                "gradient_norm_relative": abs(reference_norm - our_norm) / max(our_norm, 1e-30),
                "prediction_mismatches": int(mismatches.sum()),
                # How close to a tie our nearest neighbour was where the predictions differ: a flip by round-off
                # needs a margin of the order of float32's resolution on similarities near 1 (6e-8).
                "mismatch_margin_max": float(margins[mismatches].max(initial=0.0)),
                "weights_max_abs": weights_abs,
                "weights_relative_to_movement": weights_relative,
                "reference_movement_over_ours": movement_ratio,
                "memory": memory,
                "true_max_deviations": true_max_deviations(ours.output),
            }
            steps.append(step)
            discrete = step["prediction_mismatches"] or memory["slots_only_in_one"] or len(set(memory["written"])) > 1
            if discrete and first_discrete is None:
                first_discrete = len(steps) - 1
            continuous = (
                memory["key_max_abs"] > KEY_TOLERANCE
                or step["loss_abs"] > LOSS_TOLERANCE
                or (weights_relative or 0.0) > WEIGHT_TOLERANCE
            )
            if continuous and first_beyond_tolerance is None:
                first_beyond_tolerance = len(steps) - 1
        batch_steps = steps[-config.episode_length :]
        print(
            f"episode batch {batch}: loss reference {np.mean([s['loss'][0] for s in batch_steps]):.6f} "
            f"ours {np.mean([s['loss'][1] for s in batch_steps]):.6f}, "
            f"max loss diff {max(s['loss_abs'] for s in batch_steps):.2e}, "
            f"weights rel. {batch_steps[-1]['weights_relative_to_movement'] or 0.0:.2e}, "
            f"prediction mismatches {sum(s['prediction_mismatches'] for s in batch_steps)}, "
            f"slots only in one memory (last step) {batch_steps[-1]['memory']['slots_only_in_one']}",
            flush=True,
        )

    summary = {
        "settings": {key: str(value) for key, value in vars(config).items()},
        "steps": len(steps),
        "seconds": round(time.time() - started, 1),
        "first_discrete_divergence": None if first_discrete is None else steps[first_discrete],
        "first_beyond_tolerance": None if first_beyond_tolerance is None else steps[first_beyond_tolerance],
        "max": {
            name: max(s[name] for s in steps if s[name] is not None)
            for name in (
                "loss_abs",
                "gradient_norm_relative",
                "prediction_mismatches",
                "mismatch_margin_max",
                "weights_max_abs",
                "weights_relative_to_movement",
                "true_max_deviations",
            )
        },
        "max_key_abs": max(s["memory"]["key_max_abs"] for s in steps),
        "max_slots_only_in_one": max(s["memory"]["slots_only_in_one"] for s in steps),
        "steps_with_prediction_mismatch": sum(bool(s["prediction_mismatches"]) for s in steps),
        "rows_with_true_max_deviation": sum(s["true_max_deviations"] for s in steps),
    }
    print(json.dumps({key: value for key, value in summary.items() if key != "settings"}, indent=2))
    if config.out:
        config.out.write_text(json.dumps({"summary": summary, "steps": steps}))
    store.close()


if __name__ == "__main__":
    main()
