"""The run function `hack bench jct jct.mode=sim` dispatches to (`hack_cli.serve.bench.SIM_RUN`)."""
from hack_cli.sim.engine import run_sim as run  # noqa: F401
