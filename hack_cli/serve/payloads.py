"""One sequence's prefill->decode payload: the store's own `export_seq`/`import_seq`, or an adapter here.

`HackLayerKV` (hack_cli/methods/hack/store.py) has no `export_seq`/`import_seq` yet, so this module exports
exactly what its `transfer_bytes` counts — packed codes and min/scale of the quantized tokens, the code sums
(when `send_sums`; else the receiver rebuilds them from the codes), the 16-bit sinks and the 16-bit open block —
and installs them into a fresh store as they are (quantized pages stay quantized). Once the store implements
the two methods itself, they take precedence and the adapter is unused.
"""
from __future__ import annotations

import torch

from hack_cli.methods.base import LayerKV


def export_seq(store: LayerKV, b: int) -> dict[str, torch.Tensor]:
    if type(store).export_seq is not LayerKV.export_seq:
        return store.export_seq(b)
    if type(store).__name__ == "HackLayerKV":
        return _hack_export(store, b)
    raise NotImplementedError


def import_seq(store: LayerKV, b: int, state: dict[str, torch.Tensor]) -> None:
    if type(store).import_seq is not LayerKV.import_seq:
        return store.import_seq(b, state)
    if type(store).__name__ == "HackLayerKV":
        return _hack_import(store, b, state)
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------- HACK
def _hack_extent(s, x: str, n_closed: int, fill: int) -> tuple[int, int]:
    """(quantized tokens, blocks with quantized per-channel params) of tensor x: as `_seq_bytes` counts them."""
    req = s.cfg.requant_elimination
    q_tokens = n_closed * s.part + (fill if (not req or not s.open16[x]) else 0)
    q_blocks = n_closed + (1 if fill and not req else 0)
    return q_tokens, q_blocks


def _per_token_slots(s, x: str, name: str) -> bool:
    """Whether tensor `name` has one entry per token slot (codes, per-token min/scale, K's sums over a channel
    group) rather than one per block (per-channel min/scale, V's sums over a block's tokens)."""
    return name.endswith("codes") or name == "k_sum" or (s.kind[x] == "per_token" and not name.endswith("sum"))


def _hack_export(s, b: int) -> dict[str, torch.Tensor]:
    nc, fill, sink = int(s.n_closed[b]), int(s.fill[b]), int(s.sink_fill[b])
    out = {}  # the tensors' shapes (sent in the manifest) give the sink, closed-block and open-block counts
    for x in "kv":
        q_tokens, q_blocks = _hack_extent(s, x, nc, fill)
        names = [f"{x}_codes", f"{x}_mn", f"{x}_scale"]
        if s.cfg.summation_elimination and s.cfg.send_sums:
            names.append(f"{x}_sum")
        for name in names:  # (H, q_tokens, ...) per token slot, or (H, q_blocks, D) per block
            t = s.blocks[name][b]
            out[name] = (t.flatten(1, 2)[:, :q_tokens] if _per_token_slots(s, x, name) else t[:, :q_blocks]).contiguous()
        if s.cfg.requant_elimination and s.open16[x]:
            out[f"{x}_open"] = s.open[x][b, :, :fill].contiguous()  # (H, fill, D) 16-bit
        out[f"{x}_sinks"] = s.sinks[x][b, :, :sink].contiguous()  # (H, sink, D) 16-bit
    return out


def _hack_import(s, b: int, state: dict[str, torch.Tensor]) -> None:
    from hack_cli.methods.hack.quantizer import unpack

    sink, q_v = state["k_sinks"].shape[1], state["v_codes"].shape[1]
    nc, fill = (q_v // s.part, state["v_open"].shape[1]) if "v_open" in state else divmod(q_v, s.part)
    dev = s.device
    s._grow(nc + 1)
    for x in "kv":
        q_tokens, q_blocks = _hack_extent(s, x, nc, fill)
        for name in (f"{x}_codes", f"{x}_mn", f"{x}_scale", f"{x}_sum"):
            if name not in state:
                continue
            if _per_token_slots(s, x, name):
                flat = s.blocks[name][b].flatten(1, 2)  # (H, nb*P, ...) view
                flat[:, :q_tokens] = state[name].to(dev)
            else:
                s.blocks[name][b, :, :q_blocks] = state[name].to(dev)
        if s.cfg.summation_elimination and f"{x}_sum" not in state:  # send_sums=false: rebuild from the codes
            nb = -(-q_tokens // s.part)
            codes = unpack(s.blocks[f"{x}_codes"][b:b + 1, :, :nb], s.bits)[0]  # (H, nb, P, D)
            s._update_sums(b, x, 0, nb, codes)
        if f"{x}_open" in state:
            s.open[x][b, :, :fill] = state[f"{x}_open"].to(dev)
        s.sinks[x][b, :, :sink] = state[f"{x}_sinks"].to(dev)
    s.sink_fill[b], s.n_closed[b], s.fill[b] = sink, nc, fill
    s.lengths[b] = sink + nc * s.part + fill
