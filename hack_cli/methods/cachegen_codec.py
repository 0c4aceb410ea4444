"""CacheGen's entropy coder: ANS (the `constriction` library) over quantized symbols with sent frequency tables.

A *part* is a block of symbols (m, C): C channels of m symbols each, coded either with one table per channel
(`tables` (C, L)) or one table shared by all channels (`tables` (1, L)). Tables are frequency counts scaled to
uint8 (the largest count -> 255, every seen symbol >= 1): that is what the wire carries, and both sides build the
same probability model from it. All parts of one chunk go into one ANS stream, returned as bytes.
"""
from __future__ import annotations

import numpy as np
import torch


def freq_table(symbols: torch.Tensor, levels: int, per_channel: bool) -> torch.Tensor:
    """symbols (m, C) in [0, levels) -> uint8 table (C, levels), or (1, levels) pooled over channels."""
    s = symbols.cpu().long() if per_channel else symbols.cpu().reshape(-1, 1).long()
    C = s.shape[1]
    cell = torch.arange(C)[None] * levels + s  # (m, C): one bin per (channel, symbol)
    counts = torch.bincount(cell.reshape(-1), minlength=C * levels).reshape(C, levels).double()
    top = counts.amax(1, keepdim=True).clamp_min(1)
    return torch.where(counts > 0, (counts * 255 / top).ceil().clamp(1, 255), 0).to(torch.uint8)


def _model(table: np.ndarray):
    import constriction

    # constriction gives symbols of zero probability the smallest nonzero one, so any table codes any symbol.
    return constriction.stream.model.Categorical(table.astype(np.float64), perfect=False)


def encode(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    """[(symbols (m, C), tables (C or 1, L))] -> one ANS stream. Decode with the same shapes and tables."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, tables in parts:
        sym, tab = symbols.cpu().numpy().astype(np.int32), tables.cpu().numpy()
        if tab.shape[0] == 1:
            coder.encode_reverse(np.ascontiguousarray(sym.reshape(-1)), _model(tab[0]))
        else:
            for c in range(sym.shape[1]):
                coder.encode_reverse(np.ascontiguousarray(sym[:, c]), _model(tab[c]))
    return coder.get_compressed().tobytes()


def decode(payload: bytes, shapes: list[tuple[int, int]], tables: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `encode`: shapes [(m, C)] and tables of each part -> symbols (m, C) uint8 per part."""
    import constriction

    coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype=np.uint32).copy())
    out: list[torch.Tensor] = [None] * len(shapes)
    for p in reversed(range(len(shapes))):  # a stack: the last part encoded comes out first
        (m, C), tab = shapes[p], tables[p].cpu().numpy()
        if tab.shape[0] == 1:
            sym = coder.decode(_model(tab[0]), m * C).reshape(m, C)
        else:
            sym = np.zeros((m, C), dtype=np.int32)
            for c in reversed(range(C)):
                sym[:, c] = coder.decode(_model(tab[c]), m)
        out[p] = torch.from_numpy(sym.astype(np.uint8))
    return out
