"""A run's checkpoints as the trainer writes and resumes them (the file format is
`checkpoint`'s).

A checkpoint holds the trained components' weights (``model``: ``<role>.<key>``), the
optimizer (``optimizer``), and in ``state.json`` the `TrainState` (data position, steps
skipped, last loss, wall time), the RNGs, the estimator's state and the resolved config.
With ``train.precision = "fp16"`` the gradient scaler's state (loss scale, growth tracker)
goes with the optimizer's (``state.json``: ``grad_scaler``); a checkpoint without it
resumes with a fresh scaler.
Under torchrun rank 0 writes it, with every rank's RNG and estimator state (``ranks``).

With ``train.keep_optimizer = false`` the final checkpoint (step = ``train.steps``) leaves
the optimizer out (AdamW's moments are twice the trained weights); intermediate ones keep
it, so that an interrupted run resumes exactly. `load_model_state` puts a checkpoint's
weights into a pipeline's components (resuming, and `experiments.loading.load_run`).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentrag.core.config import ResolvedConfig
from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Estimator
from latentrag.training import distributed
from latentrag.training.checkpoint import (
    Checkpoint,
    capture_rng,
    flatten_optimizer,
    list_checkpoints,
    load_latest,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer,
)
from latentrag.training.determinism import DataOrder
from latentrag.training.errors import TrainingError
from latentrag.training.run_log import json_safe


@dataclass
class TrainState:
    """Where the loop stands, besides weights and RNGs: the data order's position, the
    steps skipped, the last loss, and the training wall time before the current stretch."""

    order: DataOrder
    skipped_steps: int = 0
    last_loss: float = math.nan
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.order.size,
            "position": self.order.position(),
            "skipped_steps": self.skipped_steps,
            "loss": json_safe(self.last_loss),
            "wall_s": self.wall_s,
        }

    @classmethod
    def from_json(cls, state: dict[str, Any], examples: int, seed: int) -> TrainState:
        """The state a checkpoint saved; ValueError when it trained on another number of
        examples."""
        if state["examples"] != examples:
            raise ValueError(
                f"it was trained on {state['examples']} examples, this run has {examples}"
            )
        loss = math.nan if state["loss"] is None else state["loss"]
        order = DataOrder(examples, seed, **state["position"])
        return cls(order, state["skipped_steps"], loss, state["wall_s"])


def _current_key(key: str) -> str:
    """Checkpoints written before 0.2 name the retriever role "prior"."""
    return "retriever." + key[len("prior.") :] if key.startswith("prior.") else key


def checkpoint_roles(checkpoint: Checkpoint) -> list[str]:
    """The roles whose weights a checkpoint holds, in the order it stores them."""
    keys = (_current_key(k) for k in checkpoint.tensors["model"])
    return list(dict.fromkeys(key.split(".", 1)[0] for key in keys))


def load_model_state(checkpoint: Checkpoint, components: dict[str, Any]) -> None:
    """Load each component's weights (``<role>.<key>`` in the checkpoint's ``model``);
    KeyError/ValueError/RuntimeError when they do not fit."""
    model = {_current_key(k): v for k, v in checkpoint.tensors["model"].items()}
    for role, component in components.items():
        prefix = role + "."
        component.load_state_dict(
            {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
        )


class Checkpointer:
    """Writes and restores the checkpoints of one run folder.

    components: trained role -> component (each object once); keep_last: how many
    checkpoints to keep; scaler: fp16's gradient scaler (`device.Precision.scaler`), saved
    and restored with the optimizer.
    """

    def __init__(
        self,
        out_dir: Path,
        components: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        estimator: Estimator,
        config: ResolvedConfig,
        keep_last: int,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.scaler = scaler
        self.components = components
        self.optimizer = optimizer
        self.estimator = estimator
        self.config = config
        self.keep_last = keep_last
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def existing(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.out_dir)

    def last_note(self) -> str:
        """The newest checkpoint, for an error message."""
        kept = self.existing()
        return f"last checkpoint: {kept[-1][1] if kept else 'none'}"

    # -- writing ------------------------------------------------------------------------

    def save(self, step: int, state: TrainState) -> None:
        """Rank 0 writes the checkpoint of `step`; every rank raises if that failed."""
        ranks = distributed.gather(
            {"rng": capture_rng(), "estimator": self.estimator.extra_state()}
        )
        failure = None
        if self.rank == 0:
            try:
                self._write(step, state, ranks)
            except LatentragError as exc:
                failure = exc
        message = distributed.from_main(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise TrainingError(message)

    def _write(self, step: int, state: TrainState, ranks: list[dict[str, Any]]) -> None:
        model = {
            f"{role}.{key}": value
            for role, component in self.components.items()
            for key, value in component.state_dict().items()
        }
        tensors = {"model": model}
        optimizer_meta = None
        if self._keeps_optimizer(step):
            tensors["optimizer"], optimizer_meta = flatten_optimizer(self.optimizer.state_dict())
        saved = {
            "step": step,
            **state.to_json(),
            "rng": capture_rng(),
            "optimizer": optimizer_meta,
            "estimator": self.estimator.extra_state(),
            "config": json.loads(json.dumps(self.config.to_dict(), default=str)),
        }
        if optimizer_meta is not None and self.scaler is not None:
            saved["grad_scaler"] = self.scaler.state_dict()  # floats and ints: JSON
        if self.world > 1:
            saved.update(world_size=self.world, ranks=ranks)
        save_checkpoint(self.out_dir, Checkpoint(step, tensors, saved), self.keep_last)

    def _keeps_optimizer(self, step: int) -> bool:
        """Every checkpoint keeps the optimizer but a finished run's final one with
        ``train.keep_optimizer = false``."""
        settings = self.config.pipeline.train
        return settings.keep_optimizer or step < settings.steps

    # -- resuming -----------------------------------------------------------------------

    def latest(self) -> Checkpoint | None:
        """`load_latest`, whose warnings about skipped damaged checkpoints are shown only
        when a good one was found (else its one-line error already names the damage)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint = load_latest(self.out_dir)
        for warning in caught:
            warnings.warn(warning.message, stacklevel=4)
        return checkpoint

    def restore(self, checkpoint: Checkpoint, examples: int, seed: int) -> TrainState:
        """Load the checkpoint's estimator state, weights and optimizer; return its
        TrainState. TrainingError, naming the checkpoint, when it does not fit this run."""
        try:
            state = TrainState.from_json(checkpoint.state, examples, seed)  # first: cheap
            self.estimator.load_extra_state(self._rank_state(checkpoint.state)["estimator"])
            self._load_tensors(checkpoint)
        except (KeyError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise TrainingError(f"{checkpoint.path} does not fit this run: {reason}") from None
        return state

    def _load_tensors(self, checkpoint: Checkpoint) -> None:
        load_model_state(checkpoint, self.components)
        if checkpoint.state.get("optimizer") is None:  # a final checkpoint without it
            if checkpoint.step < self.config.pipeline.train.steps and self.rank == 0:
                warnings.warn(
                    f"{checkpoint.path} has no optimizer state (train.keep_optimizer = false): "
                    "training goes on with fresh AdamW moments, unlike an uninterrupted run",
                    stacklevel=4,
                )
            return
        state = unflatten_optimizer(checkpoint.tensors["optimizer"], checkpoint.state["optimizer"])
        self.optimizer.load_state_dict(state)
        if self.scaler is not None and checkpoint.state.get("grad_scaler"):
            self.scaler.load_state_dict(checkpoint.state["grad_scaler"])

    def restore_rng(self, checkpoint: Checkpoint) -> bool:
        """Set this rank's RNGs as saved; False (with a warning on rank 0) when the
        checkpoint was written by another number of processes: rank 0's RNGs are restored,
        and the run will not match an uninterrupted one exactly."""
        restore_rng(self._rank_state(checkpoint.state)["rng"])
        written_by = len(checkpoint.state.get("ranks", [])) or 1
        if written_by == self.world:
            return True
        if self.rank == 0:
            warnings.warn(
                f"{checkpoint.path} was written by {written_by} process(es), this run has "
                f"{self.world}: it will not match an uninterrupted run exactly",
                stacklevel=3,
            )
        return False

    def _rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG and estimator state in a checkpoint (rank 0's when the checkpoint
        was written by another number of processes)."""
        ranks = state.get("ranks", [])
        if len(ranks) == self.world:
            return ranks[self.rank]
        return {"rng": state["rng"], "estimator": state["estimator"]}
