"""CacheGen's entropy coder: ANS (the `constriction` library) over quantized symbols with sent frequency tables.

A *part* is a block of symbols (m, C): C channels of m symbols each, coded either with one table per channel
(`tables` (C, L)) or one table shared by all channels (`tables` (1, L)). Tables are frequency counts scaled to
uint8 (the largest count -> 255, every seen symbol >= 1): that is what the wire carries, and both sides build the
same probability model from it. All parts of one chunk go into one ANS stream, returned as bytes.

Stream layout (what the decoder pops, in reverse): part by part; a shared-table part as its symbols in row-major
order, one `encode_reverse` over the whole block; a per-channel part channel after channel, each channel's m
symbols under that channel's model. Speed: constriction holds the GIL and codes ~100 M symbols/s per core when it
gets whole arrays, so each call is one contiguous int32 array with one prebuilt model; per-channel parts want
column-contiguous (Fortran-order, e.g. the `.T` of a channel-major array) symbols and are converted (from uint8, as
CacheGen holds them) at most once. The streams of one request are coded on worker processes (`cachegen_pool`).
Functions take numpy arrays or torch tensors. `counts` + `scaled` make the tables (`freq_table` for one block).
"""
from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def scaled(counts) -> np.ndarray:
    """Frequency counts (..., L) -> uint8 tables (..., L): the largest count -> 255, every seen symbol >= 1."""
    c = _np(counts).astype(np.float64)
    top = np.maximum(c.max(-1, keepdims=True, initial=0), 1)
    return np.where(c > 0, np.clip(np.ceil(c * 255 / top), 1, 255), 0).astype(np.uint8)


def counts(symbols, levels: int, per_channel: bool):
    """Histograms of one block of integer symbols (C, m), channel-major: per channel (C, levels), or (1, levels)
    pooled over channels. A numpy array is counted with numpy, a torch tensor where it is (a GPU store's symbols
    on the GPU)."""
    C = symbols.shape[0] if per_channel else 1
    if isinstance(symbols, torch.Tensor):  # one bin per (channel, symbol)
        dtype = next(t for t in (torch.int16, torch.int32, torch.int64) if C * levels <= torch.iinfo(t).max)
        first = torch.arange(0, C * levels, levels, dtype=dtype, device=symbols.device)[:, None]
        cell = first + symbols if C > 1 else symbols
        return torch.bincount(cell.reshape(-1), minlength=C * levels).reshape(C, levels)
    cell = (np.arange(C, dtype=np.int32) * levels)[:, None] + symbols if C > 1 else symbols
    return np.bincount(cell.reshape(-1), minlength=C * levels).reshape(C, levels)


def freq_table(symbols, levels: int, per_channel: bool) -> torch.Tensor:
    """symbols (m, C) in [0, levels) -> uint8 table (C, levels), or (1, levels) pooled over channels."""
    return torch.from_numpy(scaled(counts(_np(symbols).astype(np.int32).T, levels, per_channel)))


def _models(table: np.ndarray) -> list:
    import constriction

    # constriction gives symbols of zero probability the smallest nonzero one, so any table codes any symbol.
    cat = constriction.stream.model.Categorical
    return [cat(row, perfect=False) for row in table.astype(np.float64)]


def _int32(symbols, per_channel: bool) -> np.ndarray:
    """(m, C) symbols as int32 with each channel contiguous when coded per channel (a row slice of a column-major
    array already is: no copy), the whole block contiguous otherwise."""
    s = _np(symbols)
    if per_channel and s.shape[1] > 1:
        if s.dtype == np.int32 and (s.shape[0] <= 1 or s.strides[0] == s.itemsize):
            return s
        return s.astype(np.int32, order="F")
    return np.ascontiguousarray(s, dtype=np.int32)


def encode(parts: list[tuple]) -> bytes:
    """[(symbols (m, C), tables (C or 1, L))] -> one ANS stream. Decode with the same shapes and tables."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, tables in parts:
        tab = _np(tables)
        per_channel = tab.shape[0] != 1
        sym = _int32(symbols, per_channel)
        if sym.size == 0:
            continue
        models = _models(tab)
        if not per_channel:
            coder.encode_reverse(sym.reshape(-1), models[0])
        else:
            for c, model in enumerate(models):
                coder.encode_reverse(sym[:, c], model)
    return coder.get_compressed().tobytes()


def decode(payload: bytes, shapes: list[tuple[int, int]], tables: list, out: list | None = None) -> list:
    """Inverse of `encode`: the stream (bytes or a uint8 array), shapes [(m, C)] and tables of each part -> symbols
    (m, C) uint8 per part (torch).
    `out`, if given, holds one writable (m, C) numpy array per part (uint8 or wider; best with each channel
    contiguous, e.g. a column slice of a channel-major array, transposed) that the symbols are decoded into
    instead, and is returned."""
    import constriction

    coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype=np.uint32).copy())
    res: list = [None] * len(shapes)
    for p in reversed(range(len(shapes))):  # a stack: the last part encoded comes out first
        (m, C) = shapes[p]
        tab = _np(tables[p])
        dst = out[p] if out is not None else np.empty((m, C), dtype=np.uint8, order="F")
        if m * C:
            models = _models(tab)
            if tab.shape[0] == 1:
                dst[...] = coder.decode(models[0], m * C).reshape(m, C)
            else:
                for c in reversed(range(C)):
                    dst[:, c] = coder.decode(models[c], m)
        if out is None:
            res[p] = torch.from_numpy(np.ascontiguousarray(dst))
    return res if out is None else out
