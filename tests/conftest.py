"""Test environment, set at import time so it is in place before anything imports triton, wandb or transformers.

setdefault: a developer can still run e.g. `WANDB_MODE=offline pytest` on purpose.
"""
import os
import sys

import tqdm

for key, value in {
    "TRITON_INTERPRET": "1",  # Triton kernels run on the CPU interpreter
    "WANDB_MODE": "disabled",  # no W&B files unless a test asks for them
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",  # tests use packaged or local models and data only
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(key, value)

# tqdm's monitor thread refreshes stale bars from the background. A bar made inside a CliRunner invocation writes
# to that invocation's stream, closed once it returns, and the thread's error then fails whichever test runs next.
tqdm.tqdm.monitor_interval = 0

# absl (imported by rouge-score) logs through a handler bound to the sys.stderr of its import, and its close() closes
# that stream unless it is the current sys.stderr. Under pytest that is the capture stream, and Hydra's logging setup
# closes every existing handler while a CliRunner has swapped sys.stderr: pytest's stderr is closed, and the run
# crashes ("lost sys.stderr"). Bound to the process's own stderr, which absl never closes, it is harmless.
try:
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:
    pass
