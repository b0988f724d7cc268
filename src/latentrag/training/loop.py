"""The training loop. `Trainer.train` reads top to bottom: setup, the loop with its numbered
steps, cleanup; the helpers below it do one thing each.

What a run writes to ``out_dir``: ``metrics.jsonl`` (one line per optimizer step, plus
``{"step": s, "eval": {...}}`` lines) and checkpoints ``ckpt-<step>/`` (see `checkpoint`).
Training is deterministic on CPU: the data order of epoch e is a permutation seeded by
(seed, e), every RNG is checkpointed, and a resumed run ends with parameters bitwise equal
to an uninterrupted one. (With a dense retriever refreshed every N steps, this also needs
checkpoint_every to be a multiple of N: on resume the index is rebuilt from the restored
weights, which equals the uninterrupted run's index only if it was refreshed at that step.)

Under ``torchrun`` the trainer is data-parallel (see `distributed`): each rank trains on its
share of every global batch, gradients and logged numbers are averaged over the ranks, and
only rank 0 writes files; its checkpoints hold every rank's RNG and estimator state.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentrag.core.config import PipelineConfig, ResolvedConfig
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.interfaces import Retriever
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Batch, Example
from latentrag.data.readers import atomic_write_bytes
from latentrag.evaluation.measure import evaluate_qa, evaluate_retrieval
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

METRICS_FILE = "metrics.jsonl"
_RESERVED = {"step", "loss", "lr", "grad_norm", "skipped", "skipped_steps", "wall_s", "eval"}


class TrainingError(LatentragError):
    """Training cannot go on: a non-finite loss or gradient, or a checkpoint that does not
    fit the pipeline. The message is one line naming the step or the path."""


# -- small pieces the loop uses ------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Deterministic torch kernels (warning where none exists) for the block's duration."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"latentrag-data-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class DataOrder:
    """Which example comes next: epoch e visits a permutation seeded by (seed, e); a batch
    that runs past the end of an epoch continues into the next one."""

    size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        self._order: list[int] = []
        self._order_epoch = -1

    def _permutation(self) -> list[int]:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.size, generator=generator).tolist()
            self._order_epoch = self.epoch
        return self._order

    def take(self, count: int) -> list[int]:
        rows = []
        for _ in range(count):
            rows.append(self._permutation()[self.index])
            self.index += 1
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return rows

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null (JSON has no NaN); nested dicts are walked."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """metrics.jsonl, appended one flushed line at a time. Opening it keeps only the lines
    of steps <= keep_through (0: none), so a resumed run writes no duplicates."""

    def __init__(self, path: Path, keep_through: int) -> None:
        kept = [line for line in _read_lines(path) if _line_step(line) <= keep_through]
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _line_step(line: str) -> float:
    """The step of a metrics line; a torn or foreign line sorts after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _current_key(key: str) -> str:
    """Checkpoints written before 0.2 name the retriever role "prior"."""
    return "retriever." + key[len("prior.") :] if key.startswith("prior.") else key


class _NoLog:
    """The metrics log of a rank that writes no files."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# -- the trainer ---------------------------------------------------------------------------


class Trainer:
    """Trains a pipeline's components with its estimator; see the module docstring.

    eval_qa: also generate answers for EM/F1 at each evaluation (slow with a real LM);
    keep_last: how many checkpoints to keep. Both default to the config's `train.eval_qa`
    and `train.keep_last`.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        resolved_config: ResolvedConfig | PipelineConfig,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example] | None = None,
        out_dir: str | Path = "runs/latest",
        *,
        eval_qa: bool | None = None,
        progress: bool = True,
        keep_last: int | None = None,
    ) -> None:
        source = "<config>"
        if isinstance(resolved_config, ResolvedConfig):
            self.config_dict = resolved_config.to_dict()
            source = resolved_config.source
            resolved_config = resolved_config.pipeline
        else:
            self.config_dict = resolved_config.model_dump(mode="json")
        if pipeline.estimator is None:
            raise ConfigError("training needs an [estimator] section in the config")
        if not train_examples:
            raise LatentragError("training needs at least one training example")
        self.pipeline = pipeline
        self.estimator = pipeline.estimator
        self.settings = resolved_config.train
        self.eval_settings = resolved_config.eval
        self.train_examples = list(train_examples)
        self.dev_examples = list(dev_examples or [])
        self.out_dir = Path(out_dir)
        self.eval_qa = self.settings.eval_qa if eval_qa is None else eval_qa
        self.keep_last = keep_last or self.settings.keep_last
        self.progress = progress
        self.source = source
        self._check_k()
        distributed.init_from_env()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self._check_batch_divides()

        self.trained_roles = self._trained_roles()
        self.parameters = self._parameters_by_role()
        self._freeze_untrained()
        distributed.broadcast_parameters(p for _, p in self._trained_parameters())
        self.optimizer = self._build_optimizer()
        self.order = DataOrder(len(self.train_examples), self.settings.seed)
        self._warn_inexact_resume()
        self.skipped_steps = 0
        self.last_loss = math.nan
        self._wall_before = 0.0

    # -- setup helpers ---------------------------------------------------------------------

    def _check_k(self) -> None:
        """An estimator asking for more candidates than the corpus has fails at step 1 deep
        in a retriever; say so now, naming the key."""
        k = getattr(getattr(self.estimator, "config", None), "k", None)
        size = len(self.pipeline.corpus)
        if isinstance(k, int) and k > size:
            raise ConfigError(
                f"{self.source}: estimator.k: {k} is larger than the corpus ({size} passages)"
            )

    def _check_batch_divides(self) -> None:
        if self.settings.batch_size % self.world:
            raise ConfigError(
                f"{self.source}: train.batch_size: {self.settings.batch_size} does not divide "
                f"among the {self.world} processes (WORLD_SIZE); use a multiple of {self.world}"
            )

    def _trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [named for role in self.trained_roles for named in self.parameters[role]]

    def _trained_roles(self) -> list[str]:
        """Roles the estimator trains, plus the estimator's own modules (e.g. a baseline)."""
        roles = self.pipeline.roles()
        wanted = [*self.estimator.trained_roles(), "estimator"]
        return [r for r in dict.fromkeys(wanted) if r in roles]

    def _parameters_by_role(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Each role's named parameters; one shared by two roles (prior = posterior) goes to
        the first, trained roles coming first."""
        roles = self.pipeline.roles()
        order = self.trained_roles + [r for r in roles if r not in self.trained_roles]
        seen: set[int] = set()
        by_role: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for role in order:
            named = []
            for prefix, module in roles[role].trainable_modules().items():
                for name, param in module.named_parameters():
                    # parameters a component keeps frozen itself (LoRA's base) stay out
                    if param.requires_grad and id(param) not in seen:
                        seen.add(id(param))
                        named.append((f"{prefix}.{name}", param))
            by_role[role] = named
        return by_role

    def _freeze_untrained(self) -> None:
        for role, named in self.parameters.items():
            if role not in self.trained_roles:
                for _, param in named:
                    param.requires_grad_(False)

    def _lr(self, role: str) -> float:
        return self.settings.lrs.get(role, self.settings.lr)

    def _build_optimizer(self) -> torch.optim.AdamW:
        """AdamW, one parameter group per trained role; as in nanoGPT, weight decay applies
        to matrices and embeddings (dim >= 2), not to biases and norms."""
        groups = []
        for role in self.trained_roles:
            params = [p for _, p in self.parameters[role]]
            for decay in (True, False):
                chosen = [p for p in params if (p.dim() >= 2) == decay]
                if chosen:
                    wd = self.settings.weight_decay if decay else 0.0
                    groups.append(
                        {"params": chosen, "lr": self._lr(role), "weight_decay": wd, "role": role}
                    )
        if not groups:
            raise TrainingError(
                "nothing to train: the estimator trains "
                f"{', '.join(self.estimator.trained_roles())}, which have no trainable "
                "parameters in this pipeline"
            )
        try:  # the fused kernel is about 10x faster on CPU; not every device or dtype has it
            return torch.optim.AdamW(groups, lr=self.settings.lr, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=self.settings.lr)

    def _refresh_schedule(self) -> list[tuple[Retriever, int]]:
        """Each distinct retriever (prior, posterior) and every how many steps its corpus is
        re-encoded: its own `refresh_every` when it sets one (a DPR config key), else
        train.refresh_index_every."""
        schedule: dict[int, tuple[Retriever, int]] = {}
        for retriever in (self.pipeline.retriever, self.pipeline.posterior):
            if retriever is not None and id(retriever) not in schedule:
                every = retriever.refresh_every or self.settings.refresh_index_every
                schedule[id(retriever)] = (retriever, every)
        return list(schedule.values())

    def _warn_inexact_resume(self) -> None:
        every = self.settings.checkpoint_every
        for retriever, refresh in self._refresh_schedule():
            if every and refresh and every % refresh:
                warnings.warn(
                    f"train.checkpoint_every={every} is not a multiple of the index refresh "
                    f"interval {refresh} of {type(retriever).__name__}: a resumed run rebuilds "
                    "the index from the checkpoint's weights, so it will not match an "
                    "uninterrupted run exactly",
                    stacklevel=3,
                )

    # -- the loop ---------------------------------------------------------------------------

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run to `train.steps` optimizer steps (from the latest good checkpoint when
        resume=True) and return the final loss, step count and dev metrics."""
        settings = self.settings
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        with deterministic_algorithms():
            # -- setup: where to start, the metrics log, the progress bar --
            start = self._resume() if resume else self._fresh_start()
            log = self._metrics_log(start)
            # disable=None: no bar when stderr is not a terminal (logs, tests)
            show = self.progress and self.is_main
            bar = tqdm(
                total=settings.steps, initial=start, desc="train", disable=None if show else True
            )
            t0 = time.perf_counter()
            last_eval: dict[str, float] | None = None
            self._set_mode(training=True)
            try:
                for step in range(start + 1, settings.steps + 1):
                    # 1. forward and backward over grad_accum micro-batches
                    self.optimizer.zero_grad(set_to_none=True)
                    record = {"step": step, **self._accumulate_gradients(step)}
                    self.last_loss = record["loss"]
                    norms = self._grad_norms()
                    # 2. a non-finite loss or gradient stops the run, or skips the step
                    problem = self._nonfinite(record["loss"], norms)
                    if problem and settings.on_nonfinite == "stop":
                        raise TrainingError(f"step {step}: {problem}; {self._stopped_note()}")
                    if problem:
                        self.skipped_steps += 1
                        self.optimizer.zero_grad(set_to_none=True)
                    else:
                        # 3. clip the gradient and update the parameters
                        record["grad_norm"] = self._clip(norms)
                        self.optimizer.step()
                    # 4. log the step
                    record.update(skipped=bool(problem), skipped_steps=self.skipped_steps)
                    record["lr"] = self._lrs()
                    record["wall_s"] = self._wall_before + time.perf_counter() - t0
                    log.write(record)
                    bar.set_postfix(self._postfix(record), refresh=False)
                    bar.update(1)
                    # 5. re-encode the corpus with the updated retriever encoders
                    self._refresh_indexes(step)
                    # 6. evaluate on the dev examples
                    last_eval = None
                    if _every(step, settings.eval_every) and self.dev_examples and self.is_main:
                        last_eval = self.evaluate()
                        log.write({"step": step, "eval": last_eval})
                    # 7. checkpoint (wall time included, so that resume continues the clock)
                    if _every(step, settings.checkpoint_every) or step == settings.steps:
                        self._wall_before += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self._save(step)
                # -- cleanup: a final dev evaluation unless the last step had one --
                final_step = max(start, settings.steps)
                if last_eval is None and self.dev_examples and self.is_main:
                    last_eval = self.evaluate()
                    if start < settings.steps:  # a finished run, resumed, has its line
                        log.write({"step": final_step, "eval": last_eval})
            finally:
                bar.close()
                log.close()
                self._set_mode(training=False)
        return {
            "step": final_step,
            "loss": self.last_loss,
            "skipped_steps": self.skipped_steps,
            **(last_eval or {}),
        }

    # -- loop helpers -----------------------------------------------------------------------

    def _metrics_log(self, start: int) -> MetricsLog | _NoLog:
        if not self.is_main:
            return _NoLog()
        return MetricsLog(self.out_dir / METRICS_FILE, keep_through=start)

    def _fresh_start(self) -> int:
        existing = list_checkpoints(self.out_dir)
        if existing:
            raise TrainingError(
                f"{self.out_dir} already holds checkpoints (newest {existing[-1][1].name}); "
                "resume from them or train into another directory"
            )
        self._seed_rank_streams()
        return 0

    def _seed_rank_streams(self) -> None:
        """Seed the global RNGs; ranks other than 0 get their own streams (also the
        estimator's), so that they do not draw the same noise for different examples."""
        seed = distributed.rank_seed(self.settings.seed, self.rank)
        seed_everything(seed)
        if self.rank:
            self.estimator.reseed(seed)

    def _stopped_note(self) -> str:
        kept = list_checkpoints(self.out_dir)
        return f"training stopped (last checkpoint: {kept[-1][1] if kept else 'none'})"

    def _accumulate_gradients(self, step: int) -> dict[str, Any]:
        """Forward and backward grad_accum micro-batches; each loss is divided by grad_accum
        so the gradient is that of the mean over the step's examples."""
        accum = self.settings.grad_accum
        loss = 0.0
        diagnostics: dict[str, float] = {}
        counts = {"generator_forwards": 0, "generator_backwards": 0}
        chains_before = self._example_state_before()
        for _ in range(accum):
            rows = self.order.take(self.settings.batch_size)  # the same on every rank
            rows = distributed.shard(rows, self.rank, self.world)
            batch = Batch([self.train_examples[i] for i in rows])
            out = self.estimator.loss(batch, self.pipeline)
            if out.loss.requires_grad:
                (out.loss / accum).backward()
            elif math.isfinite(out.loss.item()):
                raise TrainingError(
                    f"step {step}: the estimator's loss has no gradient "
                    f"(roles trained: {', '.join(self.trained_roles)})"
                )
            loss += out.loss.item() / accum
            for name, value in out.diagnostics.items():
                key = f"estimator.{name}" if name in _RESERVED else name
                diagnostics[key] = diagnostics.get(key, 0.0) + float(value) / accum
            counts["generator_forwards"] += out.generator_forwards
            counts["generator_backwards"] += out.generator_backwards
        if self.world == 1:
            return {"loss": loss, **diagnostics, **counts}
        distributed.average_gradients([p for _, p in self._trained_parameters()])
        if chains_before is not None:
            merged = distributed.merge_example_state(chains_before, self.estimator.extra_state())
            self.estimator.load_extra_state(merged)
        return distributed.reduce_metrics({"loss": loss, **diagnostics, **counts}, summed=counts)

    def _example_state_before(self) -> dict[str, Any] | None:
        """A persistent estimator's state before a distributed step (to find its changes)."""
        if self.world > 1 and self.estimator.persistent:
            return self.estimator.extra_state()
        return None

    def _grad_norms(self) -> dict[str, Tensor]:
        norms = {}
        for role in self.trained_roles:
            grads = [p.grad for _, p in self.parameters[role] if p.grad is not None]
            if grads:
                norms[role] = torch.nn.utils.get_total_norm(grads)
        return norms

    def _nonfinite(self, loss: float, norms: dict[str, Tensor]) -> str | None:
        """What is not finite (the loss, or the gradient of which component), or None."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        for role, norm in norms.items():
            if not torch.isfinite(norm):
                bad = next(
                    (
                        name
                        for name, p in self.parameters[role]
                        if p.grad is not None and not torch.isfinite(p.grad).all()
                    ),
                    "its norm overflows",
                )
                return f"non-finite gradient in the {role} ({bad})"
        return None

    def _clip(self, norms: dict[str, Tensor]) -> float:
        if not norms:
            return 0.0
        total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
        if self.settings.max_grad_norm is not None:
            params = [p for role in norms for _, p in self.parameters[role]]
            torch.nn.utils.clip_grads_with_norm_(params, self.settings.max_grad_norm, total)
        return total.item()

    def _lrs(self) -> dict[str, float]:
        return {group["role"]: group["lr"] for group in self.optimizer.param_groups}

    @staticmethod
    def _postfix(record: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{record['loss']:.4g}"}
        if "acceptance_rate" in record:
            postfix["acc"] = f"{record['acceptance_rate']:.2f}"
        return postfix

    def _set_mode(self, training: bool) -> None:
        """Trained modules train (dropout on); frozen ones always evaluate."""
        for role, component in self.pipeline.roles().items():
            for module in component.trainable_modules().values():
                module.train(training and role in self.trained_roles)

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        self._set_mode(training=False)
        try:
            with torch.no_grad():
                yield
        finally:
            self._set_mode(training=True)

    def _refresh_indexes(self, step: int | None) -> None:
        """Refresh the retrievers due at `step`; step None: every one that ever refreshes."""
        due = [
            retriever
            for retriever, every in self._refresh_schedule()
            if (every > 0 if step is None else _every(step, every))
        ]
        with self._evaluating():
            for retriever in due:
                retriever.refresh()

    def evaluate(self) -> dict[str, float]:
        """Dev metrics: the prior's recall@k and MRR@10, plus EM/F1 when eval_qa is set."""
        metrics: dict[str, float] = {}
        with self._evaluating():
            if any(e.gold_ids for e in self.dev_examples):
                metrics.update(
                    evaluate_retrieval(
                        self.pipeline,
                        self.pipeline.corpus,
                        self.dev_examples,
                        ks=self.eval_settings.recall_at,
                    )
                )
            if self.eval_qa and self.pipeline.generator is not None:
                qa = evaluate_qa(
                    self.pipeline,
                    self.dev_examples,
                    self.eval_settings.passages,
                    self.eval_settings.max_new_tokens,
                    progress=False,
                )
                metrics.update(em=qa["em"], f1=qa["f1"])
        return metrics

    # -- checkpoints ------------------------------------------------------------------------

    def _trained_components(self) -> dict[str, Any]:
        """Trained role -> component, each component once (prior and posterior may be one)."""
        roles = self.pipeline.roles()
        unique: dict[int, str] = {}
        for role in self.trained_roles:
            unique.setdefault(id(roles[role]), role)
        return {role: roles[role] for role in unique.values()}

    def _save(self, step: int) -> None:
        """Rank 0 writes the checkpoint; every rank raises if that failed."""
        ranks = distributed.gather(
            {"rng": capture_rng(), "estimator": self.estimator.extra_state()}
        )
        failure = None
        if self.is_main:
            try:
                self._write_checkpoint(step, ranks)
            except LatentragError as exc:
                failure = exc
        message = distributed.from_main(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise TrainingError(message)

    def _write_checkpoint(self, step: int, ranks: list[dict[str, Any]]) -> None:
        model = {
            f"{role}.{key}": value
            for role, component in self._trained_components().items()
            for key, value in component.state_dict().items()
        }
        optimizer_tensors, optimizer_meta = flatten_optimizer(self.optimizer.state_dict())
        state = {
            "step": step,
            "examples": len(self.train_examples),
            "position": self.order.position(),
            "rng": capture_rng(),
            "optimizer": optimizer_meta,
            "estimator": self.estimator.extra_state(),
            "skipped_steps": self.skipped_steps,
            "loss": _json_safe(self.last_loss),
            "wall_s": self._wall_before,
            "config": json.loads(json.dumps(self.config_dict, default=str)),
        }
        if self.world > 1:
            state.update(world_size=self.world, ranks=ranks)
        tensors = {"model": model, "optimizer": optimizer_tensors}
        save_checkpoint(self.out_dir, Checkpoint(step, tensors, state), self.keep_last)

    def _load_weights(self, checkpoint: Checkpoint) -> None:
        model = {_current_key(k): v for k, v in checkpoint.tensors["model"].items()}
        for role, component in self._trained_components().items():
            prefix = role + "."
            component.load_state_dict(
                {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
            )
        state = unflatten_optimizer(checkpoint.tensors["optimizer"], checkpoint.state["optimizer"])
        self.optimizer.load_state_dict(state)

    def _load_progress(self, state: dict[str, Any]) -> None:
        if state["examples"] != len(self.train_examples):
            raise ValueError(
                f"it was trained on {state['examples']} examples, this run has "
                f"{len(self.train_examples)}"
            )
        self.order = DataOrder(len(self.train_examples), self.settings.seed, **state["position"])
        self.estimator.load_extra_state(self._rank_state(state)["estimator"])
        self.skipped_steps = state["skipped_steps"]
        self.last_loss = math.nan if state["loss"] is None else state["loss"]
        self._wall_before = state["wall_s"]

    def _load_latest(self) -> Checkpoint | None:
        """`load_latest`, whose warnings about skipped damaged checkpoints are shown only
        when a good one was found (else its one-line error already names the damage)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint = load_latest(self.out_dir)
        for warning in caught:
            warnings.warn(warning.message, stacklevel=4)
        return checkpoint

    def _resume(self) -> int:
        checkpoint = self._load_latest()
        if checkpoint is None:
            warnings.warn(f"no checkpoint in {self.out_dir}: starting from step 0", stacklevel=3)
            return self._fresh_start()
        try:
            self._load_progress(checkpoint.state)  # first: it checks the examples match
            self._load_weights(checkpoint)
        except (KeyError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise TrainingError(f"{checkpoint.path} does not fit this run: {reason}") from None
        self._refresh_indexes(step=None)
        restore_rng(self._rank_state(checkpoint.state)["rng"])
        written_by = len(checkpoint.state.get("ranks", [])) or 1
        if written_by != self.world:
            if self.is_main:
                warnings.warn(
                    f"{checkpoint.path} was written by {written_by} process(es), this run has "
                    f"{self.world}: it will not match an uninterrupted run exactly",
                    stacklevel=3,
                )
            if self.rank:
                self._seed_rank_streams()  # rank 0's streams restored: derive this rank's
        return checkpoint.step

    def _rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG and estimator state in a checkpoint (rank 0's when the checkpoint
        was written by another number of processes)."""
        ranks = state.get("ranks", [])
        if len(ranks) == self.world:
            return ranks[self.rank]
        return {"rng": state["rng"], "estimator": state["estimator"]}
