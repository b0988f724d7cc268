"""The files of a run folder, named in this one place.

A run folder (``latentrag train --out RUN``, one cell of a sweep, one run of the demo) holds

- ``config.toml``: the resolved config, written once the data and config passed every check;
- ``metrics.jsonl``: one line per optimizer step and one per evaluation (the trainer);
- ``ckpt-<step>/`` and ``latest``: checkpoints and the name of the newest (`checkpoint`);
- ``eval.json``: the run's metrics before and after training, written last and atomically:
  its presence marks the run as finished;
- ``tensorboard/``: TensorBoard event files, with ``train.loggers = ["tensorboard"]``.

This module imports nothing, so light modules (sweeps, reports) can name the files too.
"""

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CHECKPOINT_PREFIX = "ckpt-"
LATEST_FILE = "latest"
TENSORBOARD_DIR = "tensorboard"
