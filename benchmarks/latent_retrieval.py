"""Latent retrieval learned from the LM signal alone: every estimator from the same start.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latent_retrieval.py [--quick] [--seeds 5]
        [--ks 2,8] [--estimators topk,jsa-corpus-persistent,...] [--jobs 1] [--out DIR]

The task, the runs, the table and the plots are `latentrag.experiments.latent_retrieval`
(which `latentrag demo` also uses); this script only runs it from the repository root, one
thread per process, writing to benchmarks/results/latent_retrieval/ by default.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

from latentrag.experiments.latent_retrieval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
