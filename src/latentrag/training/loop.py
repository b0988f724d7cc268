"""The training loop. `Trainer.train` reads top to bottom: setup, the loop with its numbered
steps, cleanup; each concern it calls on has its own module:

- `optimizer`: the trained parameters by role and their AdamW groups;
- `gradients`: per-role gradient norms, non-finite checks, clipping;
- `determinism`: the seeded data order, RNG seeding, deterministic kernels;
- `index_refresh`: when a trained dense retriever re-encodes the corpus;
- `run_log`: ``metrics.jsonl``;
- `checkpointer`: writing checkpoints and resuming from them (`checkpoint`: the format);
- `distributed`: data parallelism under torchrun;
- `evaluation.measure`: what an evaluation measures (the trainer is handed a `Measure`).

What a run writes to ``out_dir`` is listed in `run_folder`. Training is deterministic on
CPU: the data order of epoch e is a permutation seeded by (seed, e), every RNG is
checkpointed, and a resumed run ends with parameters bitwise equal to an uninterrupted one.
(With a dense retriever refreshed every N steps, this also needs checkpoint_every to be a
multiple of N: on resume the index is rebuilt from the restored weights, which equals the
uninterrupted run's index only if it was refreshed at that step.)

Under ``torchrun`` the trainer is data-parallel: each rank trains on its share of every
global batch, gradients (exactly per parameter, or by DistributedDataParallel: see
``train.data_parallel`` and `distributed.GradientSync`) and logged numbers are averaged over
the ranks, and only rank 0 writes files and evaluates; its checkpoints hold every rank's
RNG and estimator state.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from latentrag.core.config import ResolvedConfig, TrainConfig
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Batch, Example
from latentrag.evaluation.measure import Measure, measure_with
from latentrag.training import distributed, gradients
from latentrag.training.checkpointer import Checkpointer, TrainState
from latentrag.training.determinism import DataOrder, deterministic_algorithms, seed_everything
from latentrag.training.device import Precision, place, resolve_device
from latentrag.training.errors import TrainingError
from latentrag.training.index_refresh import IndexRefresh
from latentrag.training.optimizer import RoleParameters, build_optimizer, learning_rates
from latentrag.training.run_folder import METRICS_FILE
from latentrag.training.run_log import diagnostic_key, open_run_log

__all__ = ["DataOrder", "Trainer", "TrainingError"]


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


class Trainer:
    """Trains a pipeline's components with its estimator; see the module docstring.

    config: the run's resolved config (`core.config.resolve` / `load_config`).
    dev_examples: evaluated every `train.eval_every` steps and after the last step, with
    `measure` (default: `evaluation.measure.measure` with the config's [eval]). Periodic
    evaluations answer the questions (EM/F1) only with eval_qa (default `train.eval_qa`);
    the last one, the run's result, always does when the pipeline has a generator.
    keep_last: how many checkpoints to keep (default `train.keep_last`).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        config: ResolvedConfig,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example] | None = None,
        out_dir: str | Path = "runs/latest",
        *,
        measure: Measure | None = None,
        eval_qa: bool | None = None,
        progress: bool = True,
        keep_last: int | None = None,
    ) -> None:
        if not isinstance(config, ResolvedConfig):
            raise TypeError(
                f"Trainer takes a ResolvedConfig (core.config.resolve), not {type(config).__name__}"
            )
        if pipeline.estimator is None:
            raise ConfigError("training needs an [estimator] section in the config")
        if not train_examples:
            raise LatentragError("training needs at least one training example")
        self.pipeline, self.estimator, self.config = pipeline, pipeline.estimator, config
        self.train_examples = list(train_examples)
        self.dev_examples = list(dev_examples or [])
        self.out_dir = Path(out_dir)
        self.measure = measure or measure_with(config.pipeline.eval, progress=progress)
        self.eval_qa = self.settings.eval_qa if eval_qa is None else eval_qa
        self.progress = progress
        self._check_k()
        distributed.init_from_env()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self._check_batch_divides()
        local_rank = distributed.local_rank() if self.world > 1 else None
        self.device = resolve_device(self.settings.device, config.source, local_rank)
        self.precision = Precision(self.settings.precision, self.device, config.source)
        place(pipeline, self.device)  # before the optimizer, which holds the parameters

        self.parameters = RoleParameters(pipeline)
        self.parameters.freeze_untrained()
        distributed.broadcast_parameters(self.parameters.trained_parameters())
        self.optimizer = build_optimizer(self.parameters, self.settings)
        self.checkpointer = Checkpointer(
            self.out_dir,
            self.parameters.trained_components(),
            self.optimizer,
            self.estimator,
            config,
            keep_last or self.settings.keep_last,
            scaler=self.precision.scaler,
        )
        self.sync = self._gradient_sync()
        self.state = TrainState(DataOrder(len(self.train_examples), self.settings.seed))
        self.final_metrics: dict[str, float] = {}
        self.index_refresh = IndexRefresh(pipeline, self.settings.refresh_index_every)
        self.index_refresh.warn_if_resume_inexact(self.settings.checkpoint_every)

    @property
    def settings(self) -> TrainConfig:
        return self.config.pipeline.train

    # -- checks ------------------------------------------------------------------------

    def _check_k(self) -> None:
        """An estimator asking for more candidates than the corpus has fails at step 1 deep
        in a retriever; say so now, naming the key."""
        config = getattr(self.estimator, "config", None)
        k = getattr(config, "k", None)
        size = len(self.pipeline.corpus)
        chosen = "k" in getattr(config, "model_fields_set", {"k"})  # a default k is clipped
        if isinstance(k, int) and k > size and chosen:
            raise ConfigError(
                f"{self.config.source}: estimator.k: {k} is larger than the corpus "
                f"({size} passages)"
            )

    def _gradient_sync(self) -> distributed.GradientSync:
        """How the ranks average gradients (`train.data_parallel`); nothing alone."""
        mode = distributed.choose_mode(self.settings.data_parallel, self.device, self.world)
        roles = self.pipeline.roles()
        modules = [
            module
            for role in self.parameters.trained
            for module in roles[role].trainable_modules().values()
        ]
        pipeline, estimator = self.pipeline, self.estimator
        return distributed.GradientSync(
            mode,
            modules,
            self.parameters.trained_parameters(),
            lambda batch: estimator.loss(batch, pipeline),
        )

    def _check_batch_divides(self) -> None:
        if self.settings.batch_size % self.world:
            raise ConfigError(
                f"{self.config.source}: train.batch_size: {self.settings.batch_size} does not "
                f"divide among the {self.world} processes (WORLD_SIZE); use a multiple of "
                f"{self.world}"
            )

    # -- the loop ------------------------------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run to `train.steps` optimizer steps (from the latest good checkpoint when
        resume=True); return the step, the final loss, the steps skipped, the training
        wall time and the final dev metrics (also kept in `final_metrics`)."""
        settings = self.settings
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        with deterministic_algorithms():
            # -- setup: where to start, the run log, the progress bar --
            start = self._resume() if resume else self._fresh_start()
            state = self.state
            metrics = self.out_dir / METRICS_FILE
            log = open_run_log(metrics, start, writes=self.is_main, config=self.config)
            show = self.progress and self.is_main  # None: no bar unless stderr is a terminal
            bar = tqdm(
                total=settings.steps, initial=start, desc="train", disable=None if show else True
            )
            t0 = time.perf_counter()
            self.parameters.set_mode(training=True)
            try:
                for step in range(start + 1, settings.steps + 1):
                    # 1. forward and backward over grad_accum micro-batches
                    self.optimizer.zero_grad(set_to_none=True)
                    record = {"step": step, **self._accumulate_gradients(step)}
                    state.last_loss = record["loss"]
                    self.precision.unscale(self.optimizer)
                    norms = gradients.grad_norms(self.parameters)
                    # 2. a non-finite loss or gradient stops the run, or skips the step
                    problem = gradients.nonfinite(record["loss"], norms, self.parameters)
                    overflow = problem and self.precision.overflowed(record["loss"])
                    if problem and settings.on_nonfinite == "stop" and not overflow:
                        note = self.checkpointer.last_note()
                        raise TrainingError(f"step {step}: {problem}; training stopped ({note})")
                    if problem:
                        state.skipped_steps += 1
                        self.optimizer.zero_grad(set_to_none=True)
                        self.precision.skip()
                    else:
                        # 3. clip the gradient and update the parameters
                        max_norm = settings.max_grad_norm
                        record["grad_norm"] = gradients.clip(norms, self.parameters, max_norm)
                        self.precision.step(self.optimizer)
                    # 4. log the step
                    record.update(skipped=bool(problem), skipped_steps=state.skipped_steps)
                    record["lr"] = learning_rates(self.optimizer)
                    record["wall_s"] = state.wall_s + time.perf_counter() - t0
                    log.write(record)
                    bar.set_postfix(_postfix(record), refresh=False)
                    bar.update(1)
                    # 5. re-encode the corpus with the updated retriever encoders
                    self._refresh_indexes(step)
                    # 6. evaluate on the dev examples; the last step's is the run's result
                    last = step == settings.steps
                    if (_every(step, settings.eval_every) or last) and self._evaluates():
                        self.final_metrics = self.evaluate(qa=self.eval_qa or last)
                        log.write({"step": step, "eval": self.final_metrics})
                    # 7. checkpoint (wall time included, so that resume continues the clock)
                    if _every(step, settings.checkpoint_every) or last:
                        state.wall_s += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.checkpointer.save(step, state)
                # -- cleanup: a finished run, resumed, trains nothing: measure it again --
                if start >= settings.steps and self._evaluates():
                    self.final_metrics = self.evaluate(qa=True)
            finally:
                bar.close()
                log.close()
                self.parameters.set_mode(training=False)
        return {
            "step": max(start, settings.steps),
            "loss": state.last_loss,
            "skipped_steps": state.skipped_steps,
            "wall_s": state.wall_s,
            **self.final_metrics,
        }

    def _accumulate_gradients(self, step: int) -> dict[str, Any]:
        """Forward and backward grad_accum micro-batches; each loss is divided by grad_accum
        so the gradient is that of the mean over the step's examples."""
        accum = self.settings.grad_accum
        loss = 0.0
        diagnostics: dict[str, float] = {}
        counts = {"generator_forwards": 0, "generator_backwards": 0}
        chains_before = self._example_state_before()
        for index in range(accum):
            rows = self.state.order.take(self.settings.batch_size)  # the same on every rank
            rows = distributed.shard(rows, self.rank, self.world)
            batch = Batch([self.train_examples[i] for i in rows])
            with self.sync.micro_batch(last=index == accum - 1):
                with self.precision.autocast():
                    out = self.sync.loss(batch)
                if out.loss.requires_grad:
                    self.precision.backward(out.loss.float() / accum)
                elif math.isfinite(out.loss.item()):
                    raise TrainingError(
                        f"step {step}: the estimator's loss has no gradient "
                        f"(roles trained: {', '.join(self.parameters.trained)})"
                    )
            loss += out.loss.item() / accum
            for name, value in out.diagnostics.items():
                key = diagnostic_key(name)
                diagnostics[key] = diagnostics.get(key, 0.0) + float(value) / accum
            counts["generator_forwards"] += out.generator_forwards
            counts["generator_backwards"] += out.generator_backwards
        if self.world == 1:
            return {"loss": loss, **diagnostics, **counts}
        self.sync.finish()
        if chains_before is not None:
            merged = distributed.merge_example_state(chains_before, self.estimator.extra_state())
            self.estimator.load_extra_state(merged)
        return distributed.reduce_metrics({"loss": loss, **diagnostics, **counts}, summed=counts)

    def _example_state_before(self) -> dict[str, Any] | None:
        """A persistent estimator's state before a distributed step (to find its changes)."""
        if self.world > 1 and self.estimator.persistent:
            return self.estimator.extra_state()
        return None

    # -- evaluation and index refresh --------------------------------------------------

    def _evaluates(self) -> bool:
        """Whether this process evaluates: rank 0, when there are dev examples."""
        return self.is_main and bool(self.dev_examples)

    def evaluate(self, qa: bool | None = None) -> dict[str, float]:
        """The dev metrics now (`measure`), modules in eval mode; qa: answer the questions
        too (default: eval_qa)."""
        with self._evaluating():
            qa = self.eval_qa if qa is None else qa
            return self.measure(self.pipeline, self.dev_examples, qa=qa)

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        self.parameters.set_mode(training=False)
        try:
            with torch.no_grad():
                yield
        finally:
            self.parameters.set_mode(training=True)

    def _refresh_indexes(self, step: int | None) -> None:
        """Re-encode the corpus with the retrievers due at `step` (`IndexRefresh.due`)."""
        with self._evaluating():
            for retriever in self.index_refresh.due(step):
                retriever.refresh()

    # -- where a run starts --------------------------------------------------------------

    def _fresh_start(self) -> int:
        existing = self.checkpointer.existing()
        if existing:
            raise TrainingError(
                f"{self.out_dir} already holds checkpoints (newest {existing[-1][1].name}); "
                "resume from them or train into another directory"
            )
        self._seed_rank_streams()
        return 0

    def _resume(self) -> int:
        checkpoint = self.checkpointer.latest()
        if checkpoint is None:
            warnings.warn(f"no checkpoint in {self.out_dir}: starting from step 0", stacklevel=3)
            return self._fresh_start()
        examples, seed = len(self.train_examples), self.settings.seed
        self.state = self.checkpointer.restore(checkpoint, examples, seed)
        self._refresh_indexes(step=None)
        exact = self.checkpointer.restore_rng(checkpoint)
        if not exact and self.rank:
            self._seed_rank_streams()  # rank 0's streams restored: derive this rank's
        return checkpoint.step

    def _seed_rank_streams(self) -> None:
        """Seed the global RNGs; ranks other than 0 get their own streams (also the
        estimator's), so that they do not draw the same noise for different examples."""
        seed = distributed.rank_seed(self.settings.seed, self.rank)
        seed_everything(seed)
        if self.rank:
            self.estimator.reseed(seed)


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's summary of a step."""
    postfix = {"loss": f"{record['loss']:.4g}"}
    if "acceptance_rate" in record:
        postfix["acc"] = f"{record['acceptance_rate']:.2f}"
    return postfix
