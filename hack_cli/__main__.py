"""`python -m hack_cli` is the `hack` command."""
from hack_cli.cli import main

main()
