"""Join the rows of shard copies of a run (`accuracy.shard=[i,n]`, each resuming a copy of one run directory) into
that run directory: each key once, the destination's rows first, then each source's new rows in order.

    python -m hack_cli.eval.merge DEST SOURCE_DIR [SOURCE_DIR ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

from hack_cli.eval.table import SAMPLES
from hack_cli.store import RowLog, read_rows


def merge(dest: Path, sources: list[Path]) -> int:
    """Appends to `dest`/samples.jsonl every row of the sources whose key it lacks; returns how many."""
    dest.mkdir(parents=True, exist_ok=True)
    log, added = RowLog(dest / SAMPLES), 0
    try:
        for source in sources:
            for row in read_rows(Path(source) / SAMPLES):  # a killed job's torn last line left out
                if row["key"] not in log.done:
                    log.write(row)
                    added += 1
    finally:
        log.close()
    return added


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m hack_cli.eval.merge DEST SOURCE_DIR [SOURCE_DIR ...]")
    missing = [a for a in argv[1:] if not (Path(a) / SAMPLES).exists()]
    if missing:
        sys.exit(f"error: no {SAMPLES} in {missing[0]}")
    print(f"{merge(Path(argv[0]), [Path(a) for a in argv[1:]])} rows added to {Path(argv[0]) / SAMPLES}")


if __name__ == "__main__":
    main(sys.argv[1:])
