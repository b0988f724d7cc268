"""One training run as the CLI and sweeps perform it: folder layout and final evaluation.

A run folder holds `config.toml` (the resolved config), `metrics.jsonl` and checkpoints
(written by the trainer), and `eval.json` (written last, atomically: its presence marks
the run as finished).
"""

from __future__ import annotations

import json
from pathlib import Path

from latentrag.core.config import ResolvedConfig
from latentrag.core.errors import LatentragError
from latentrag.data.dataset import load_dataset
from latentrag.io.atomic import atomic_write_bytes
from latentrag.io.toml_writer import dumps

EVAL_FILE = "eval.json"


def train_run(
    resolved: ResolvedConfig, config_path: Path, out_dir: Path, resume: bool = False
) -> dict[str, float]:
    """Train, evaluate before and after on the dev split, and write the run folder."""
    from latentrag.core.pipeline import Pipeline
    from latentrag.evaluation.measure import evaluate_qa, evaluate_retrieval
    from latentrag.training.distributed import is_main  # under torchrun, only rank 0 writes files
    from latentrag.training.loop import Trainer

    settings = resolved.pipeline
    dataset = load_dataset(settings.data, base=config_path.parent)
    pipeline = Pipeline.from_config(resolved, dataset.corpus)
    train_examples = dataset.split("train", settings.data.max_train)
    dev_examples = dataset.split("dev", settings.data.max_eval)
    ks = settings.eval.recall_at
    trainer = Trainer(pipeline, resolved, train_examples, dev_examples, out_dir)
    if is_main():  # only once data and config passed every check: a bad run writes nothing
        _write_config(out_dir, resolved)

    before = evaluate_retrieval(pipeline, dataset.corpus, dev_examples, ks=ks)
    trainer.train(resume=resume)
    after = evaluate_retrieval(pipeline, dataset.corpus, dev_examples, ks=ks)
    if pipeline.generator is not None:
        qa = evaluate_qa(
            pipeline, dev_examples, settings.eval.passages, settings.eval.max_new_tokens
        )
        after.update({k: v for k, v in qa.items() if k in ("em", "f1")})

    result = {**after, **{f"{k} (before)": v for k, v in before.items()}}
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if is_main():
        atomic_write_bytes(out_dir / EVAL_FILE, text.encode("utf-8"))
    return result


def _write_config(out_dir: Path, resolved: ResolvedConfig) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.toml", dumps(resolved.to_dict()).encode("utf-8"))
    except OSError as exc:
        raise LatentragError(f"{out_dir}: cannot write the run folder ({exc.strerror})") from None
