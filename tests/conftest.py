"""Test environment, set at import time so it is in place before anything imports triton, wandb or transformers.

setdefault: a developer can still run e.g. `WANDB_MODE=offline pytest` on purpose.
"""
import os

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
