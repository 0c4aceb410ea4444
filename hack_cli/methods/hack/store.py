"""HACK's KV store for one layer (HACK.md §4–6): codes, min/scale and code sums per block of Π tokens.

Both partition layouts share one storage scheme. Every tensor is either
  * per_token: quantized as soon as a token arrives, in groups of c = min(Π, D) channels, or
  * per_channel: quantized per channel over a block of Π tokens, so only once the block is full.
layout=channel (the authors' artifact): K per_channel, V per_token; the open block of both stays 16-bit.
layout=token (arXiv v1): K per_token (quantized at once), V per_channel; only V's open block stays 16-bit.

Slots after the sink tokens are addressed as (block β, offset i) at position sinks + β·Π + i. Sequence b has
`n_closed[b]` full blocks and `fill[b]` tokens in its last block: with requantization elimination that block is
the 16-bit open block; without it, it is quantized and re-quantized from its dequantized values on every
append (the paper's ablation: error accumulates). Empty slots hold zero codes, min and scale.

Codes are packed 8/b to a byte along the axis each product contracts: K's along the head dim (q·k sums over
channels), V's along each block's tokens (P·V sums over tokens): k_codes (B, H, NB, Π, D·b/8), v_codes
(B, H, NB, D, Π·b/8). The decode kernel then widens both tiles straight into its dot operands (kernels/NOTES.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from hack_cli.methods.base import Bytes, LayerKV, grown_capacity, key_mask, masked_softmax
from hack_cli.methods.hack import homomorphic as hm
from hack_cli.methods.hack.quantizer import dequantize, pack, quantize, sum_dtype, unpack


class HackLayerKV(LayerKV):
    def __init__(self, cfg, layer_idx: int, batch: int, kv_heads: int, head_dim: int, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.cfg, self.layer_idx = cfg, layer_idx
        self.part, self.bits = cfg.partition, cfg.bits
        self.group = min(cfg.partition, head_dim)  # c: channels per group along the head dim
        if head_dim % self.group:
            raise ValueError(f"head_dim {head_dim} does not split into channel groups of {self.group}")
        self.groups = head_dim // self.group
        self.kind = {"k": "per_channel", "v": "per_token"} if cfg.layout == "channel" else \
                    {"k": "per_token", "v": "per_channel"}
        # Which tensors the open block keeps in 16 bits (requantization elimination on).
        self.open16 = {"k": cfg.layout == "channel", "v": True}
        self.tail_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        self.meta_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.meta_dtype]
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 100_003 + layer_idx)
        B, H, D, S, P = batch, kv_heads, head_dim, cfg.sink_tokens, self.part
        self.sink_fill = torch.zeros(B, dtype=torch.long)
        self.n_closed = torch.zeros(B, dtype=torch.long)
        self.fill = torch.zeros(B, dtype=torch.long)
        self.sinks = {x: torch.zeros(B, H, S, D, dtype=self.tail_dtype, device=self.device) for x in "kv"}
        self.open = {x: torch.zeros(B, H, P, D, dtype=self.tail_dtype, device=self.device) for x in "kv"}
        self.blocks: dict[str, torch.Tensor] = {}
        self._grow(1)

    # ------------------------------------------------------------------------------------------ storage
    def _shapes(self, nb: int) -> dict[str, tuple[tuple, torch.dtype]]:
        B, H, D, P, G = self.batch, self.kv_heads, self.head_dim, self.part, self.groups
        shapes = {}
        for x in "kv":
            shapes[f"{x}_codes"] = ((B, H, nb, P, D * self.bits // 8) if x == "k" else (B, H, nb, D, P * self.bits // 8),
                                    torch.uint8)
            meta = (B, H, nb, P, G) if self.kind[x] == "per_token" else (B, H, nb, D)
            shapes[f"{x}_mn"] = shapes[f"{x}_scale"] = (meta, self.meta_dtype)
        if not self.cfg.summation_elimination:
            return shapes
        # Code sums over the inner axis of each product: K over a channel group, V over a block's tokens.
        shapes["k_sum"] = ((B, H, nb, P, G), sum_dtype(self.group, self.bits))
        shapes["v_sum"] = ((B, H, nb, D), sum_dtype(P, self.bits))
        return shapes

    def _grow(self, need: int) -> None:
        have = self.blocks["k_codes"].shape[2] if self.blocks else 0
        if need <= have:
            return
        nb = grown_capacity(have, need, 1)
        for name, (shape, dt) in self._shapes(nb).items():
            new = torch.zeros(shape, dtype=dt, device=self.device)
            if have:
                new[:, :, :have] = self.blocks[name]
            self.blocks[name] = new

    def _unpack(self, x: str, packed: torch.Tensor) -> torch.Tensor:
        """Stored codes of whole blocks (..., nb, Π, D·b/8) for K, (..., nb, D, Π·b/8) for V -> (..., nb, Π, D)."""
        codes = unpack(packed, self.bits)
        return codes if x == "k" else codes.transpose(-1, -2)

    def _pack(self, x: str, codes: torch.Tensor) -> torch.Tensor:
        """(..., nb, Π, D) codes -> the stored packing of tensor x (the inverse of `_unpack`)."""
        return pack(codes if x == "k" else codes.transpose(-1, -2), self.bits)

    def _code_bytes(self, x: str, q_tokens: int) -> int:
        """Bytes of one head's packed codes for q_tokens slots: V's are packed per block along the tokens, so a
        partly filled block (requantization ablation only) takes the whole bytes its tokens touch."""
        if x == "k":
            return q_tokens * self.head_dim * self.bits // 8
        full, rem = divmod(q_tokens, self.part)
        return self.head_dim * (full * self.part * self.bits // 8 + -(-rem * self.bits // 8))

    def _quantize_into(self, b: int, x: str, slot0: int, vals: torch.Tensor) -> None:
        """Quantize raw values vals (H, n, D) into slots slot0.. of sequence b. per_channel writes start a block."""
        H, n, D = vals.shape
        if self.cfg.backend == "triton" or (self.cfg.backend == "auto" and vals.is_cuda):  # Triton kernel (issue 5)
            from hack_kernels import dispatch
            if dispatch.quantize_into(self, b, x, slot0, vals):
                return
        P, where = self.part, f"layer {self.layer_idx} {x.upper()}"
        beta0, off = divmod(slot0, P)
        nb = -(-(off + n) // P)
        self._grow(beta0 + nb)
        codes_all = self.blocks[f"{x}_codes"][b, :, beta0:beta0 + nb]  # (H, nb, P, D*b/8) or (H, nb, D, P*b/8)
        if self.kind[x] == "per_token":
            codes, mn, scale, _ = quantize(vals, self.bits, self.group, self.cfg.rounding, self.meta_dtype,
                                           self.gen, where)  # (H, n, D), (H, n, G) x2
            for name, val in ((f"{x}_mn", mn), (f"{x}_scale", scale)):
                t = self.blocks[name][b, :, beta0:beta0 + nb].flatten(1, 2).clone()  # (H, nb*P, G)
                t[:, off:off + n] = val
                self.blocks[name][b, :, beta0:beta0 + nb] = t.unflatten(1, (nb, P))
            unpacked = self._unpack(x, codes_all).flatten(1, 2)  # (H, nb*P, D)
            unpacked[:, off:off + n] = codes
        else:
            assert off == 0, "per-channel quantization starts at a block boundary"
            pad = nb * P - n  # replicate the last token so padding leaves min/max unchanged
            full = torch.cat([vals, vals[:, -1:].expand(H, pad, D)], 1) if pad else vals
            blocks = full.reshape(H, nb, P, D).transpose(-1, -2)  # (H, nb, D, P)
            codes, mn, scale, _ = quantize(blocks, self.bits, P, self.cfg.rounding, self.meta_dtype, self.gen,
                                           where)  # (H, nb, D, P), (H, nb, D, 1) x2
            self.blocks[f"{x}_mn"][b, :, beta0:beta0 + nb] = mn[..., 0]
            self.blocks[f"{x}_scale"][b, :, beta0:beta0 + nb] = scale[..., 0]
            unpacked = codes.transpose(-1, -2).flatten(1, 2).clone()  # (H, nb*P, D)
            unpacked[:, n:] = 0  # empty slots hold zero codes
        self.blocks[f"{x}_codes"][b, :, beta0:beta0 + nb] = self._pack(x, unpacked.reshape(H, nb, P, D))
        self._update_sums(b, x, beta0, nb, unpacked.reshape(H, nb, P, D))

    def _update_sums(self, b: int, x: str, beta0: int, nb: int, codes: torch.Tensor) -> None:
        """codes (H, nb, P, D) of blocks beta0..: refresh the cached sums of those blocks."""
        if self.cfg.summation_elimination:
            self.blocks[f"{x}_sum"][b, :, beta0:beta0 + nb] = self._code_sums(x, codes).to(self.blocks[f"{x}_sum"].dtype)

    def _dequantize_slots(self, b: int, x: str, beta: int, n: int) -> torch.Tensor:
        """Values of the first n slots of block beta of sequence b, dequantized: (H, n, D). Ablation only."""
        codes = self._unpack(x, self.blocks[f"{x}_codes"][b, :, beta])[:, :n]  # (H, n, D)
        mn, scale = self.blocks[f"{x}_mn"][b, :, beta], self.blocks[f"{x}_scale"][b, :, beta]
        if self.kind[x] == "per_token":
            return dequantize(codes, mn[:, :n], scale[:, :n], self.group)
        return mn.float()[:, None, :] + scale.float()[:, None, :] * codes.float()

    # ------------------------------------------------------------------------------------------ append
    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        S, P = self.cfg.sink_tokens, self.part
        # Every path (sinks, open block, quantizer) takes the 16-bit values a serving model makes; the quantizers
        # widen them to fp32 themselves.
        k, v = k.to(self.tail_dtype), v.to(self.tail_dtype)
        take = min(S - int(self.sink_fill[b]), k.shape[1])
        if take:
            s0 = int(self.sink_fill[b])
            self.sinks["k"][b, :, s0:s0 + take] = k[:, :take]
            self.sinks["v"][b, :, s0:s0 + take] = v[:, :take]
            self.sink_fill[b] += take
        new = {"k": k[:, take:], "v": v[:, take:]}  # (H, T', D)
        pos, total = 0, new["k"].shape[1]
        while pos < total:
            nc, fill = int(self.n_closed[b]), int(self.fill[b])
            if fill == 0 and total - pos >= P:  # whole blocks at once
                n = (total - pos) // P * P
                for x in "kv":
                    self._quantize_into(b, x, nc * P, new[x][:, pos:pos + n])
                self.n_closed[b] += n // P
                pos += n
                continue
            n = min(P - fill, total - pos)
            chunk = {x: new[x][:, pos:pos + n] for x in "kv"}
            if self.cfg.requant_elimination:
                self._append_open(b, nc, fill, chunk)
            else:
                self._append_requantized(b, nc, fill, chunk)
            pos += n
            self.fill[b] += n
            if int(self.fill[b]) == P:
                self.close_block(b)

    def close_block(self, b: int) -> None:
        """Sequence b's last block has Π tokens: quantize what the open block kept in 16 bits, start a new block."""
        nc = int(self.n_closed[b])
        if self.cfg.requant_elimination:
            for x in "kv":
                if self.open16[x]:
                    self._quantize_into(b, x, nc * self.part, self.open[x][b].float())
                    self.open[x][b] = 0  # empty slots hold zeros
        self.n_closed[b] += 1
        self.fill[b] = 0

    def _append_open(self, b: int, nc: int, fill: int, chunk: dict) -> None:
        """Requantization elimination: the open block keeps 16-bit values until Π tokens have arrived."""
        n = chunk["k"].shape[1]
        for x in "kv":
            if self.open16[x]:
                self.open[x][b, :, fill:fill + n] = chunk[x]
            else:  # per-token K of the token layout is quantized at once
                self._quantize_into(b, x, nc * self.part + fill, chunk[x])

    def _append_requantized(self, b: int, nc: int, fill: int, chunk: dict) -> None:
        """Ablation: the partial block is quantized; per-channel tensors re-quantize it from dequantized values."""
        for x in "kv":
            if self.kind[x] == "per_token":
                self._quantize_into(b, x, nc * self.part + fill, chunk[x])
            else:
                old = self._dequantize_slots(b, x, nc, fill) if fill else chunk[x][:, :0].float()
                self._quantize_into(b, x, nc * self.part, torch.cat([old, chunk[x].float()], 1))

    # ------------------------------------------------------------------------------------------ attend
    def _code_sums(self, x: str, codes: torch.Tensor) -> torch.Tensor:
        """Sums over each product's inner axis. K: (..., P, D) -> (..., P, G); V: (..., P, D) -> (..., D)."""
        if x == "k":
            return codes.reshape(*codes.shape[:-1], self.groups, self.group).sum(-1, dtype=torch.int32)
        return codes.sum(-2, dtype=torch.int32)

    def _sums(self, x: str, codes: torch.Tensor, cached: Optional[torch.Tensor]) -> torch.Tensor:
        """The cached sums, or (summation elimination off) the same sums recomputed from the codes."""
        return cached if self.cfg.summation_elimination else self._code_sums(x, codes)

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        if self.cfg.backend == "triton" or (self.cfg.backend == "auto" and q.is_cuda):  # Triton kernel (issue 5)
            from hack_kernels import dispatch
            out = dispatch.attend(self, q, scaling, window)
            if out is not None:
                return out
        B, Hq, Tq, D = q.shape
        H, P, S = self.kv_heads, self.part, self.cfg.sink_tokens
        G = Hq // H
        dev = self.device
        qr = (q.float() * scaling).reshape(B, H, G * Tq, D)  # (B, H, R, D): GQA rows of one KV head
        q_pos = self.q_pos[:, -Tq:].repeat(1, G).to(dev)  # (B, R) matching qr's (G, Tq) row order
        req = self.cfg.requant_elimination
        nc, fill, sink_fill = self.n_closed.to(dev), self.fill.to(dev), self.sink_fill.to(dev)
        nb = int((self.n_closed + (0 if req else (self.fill > 0).long())).max())  # quantized blocks in use
        scores, values = [], []  # per segment: (B, H, R, N) scores; fn(P) -> (B, H, R, D)

        # sinks (16-bit)
        if S:
            ks, vs = self.sinks["k"].float(), self.sinks["v"].float()  # (B, H, S, D)
            pos = torch.arange(S, device=dev).expand(B, S)
            scores.append((qr @ ks.transpose(-1, -2), pos, pos < sink_fill[:, None]))
            values.append(lambda p, vs=vs: p @ vs)

        # quantized blocks
        if nb:
            codes = {x: self._unpack(x, self.blocks[f"{x}_codes"][:, :, :nb]) for x in "kv"}  # (B,H,nb,P,D)
            blk = torch.arange(nb, device=dev)[:, None]  # (nb, 1)
            slot = torch.arange(P, device=dev)  # (P,)
            ok = (blk[None] < nc[:, None, None]) | (
                (blk[None] == nc[:, None, None]) & (slot[None, None] < fill[:, None, None]) & (not req))
            pos = S + (blk * P + slot).flatten()[None].expand(B, nb * P)  # (B, nb*P)
            m = {name: t[:, :, :nb] for name, t in self.blocks.items() if not name.endswith("codes")}
            if self.kind["k"] == "per_channel":
                s = hm.scores_channel_k(qr, codes["k"], m["k_mn"], m["k_scale"], self._sums("k", codes["k"], m.get("k_sum")), self.bits)
                s = s.flatten(-2)  # (B, H, R, nb*P)
            else:
                flat = lambda t: t.flatten(2, 3)  # (B, H, nb*P, ...)
                s = hm.scores_token_k(qr, flat(codes["k"]), flat(m["k_mn"]), flat(m["k_scale"]),
                                      flat(self._sums("k", codes["k"], m.get("k_sum"))), self.bits)
            scores.append((s, pos, ok.flatten(1)))
            if self.kind["v"] == "per_token":
                values.append(lambda p: hm.values_channel_v(p.unflatten(-1, (nb, P)), codes["v"], m["v_mn"],
                                                            m["v_scale"], self._sums("v", codes["v"], m.get("v_sum")), self.bits))
            else:
                values.append(lambda p: hm.values_token_v(p.unflatten(-1, (nb, P)), ok[:, None], codes["v"],
                                                          m["v_mn"], m["v_scale"], self._sums("v", codes["v"], m.get("v_sum")),
                                                          self.bits))

        # open block (16-bit V; 16-bit K in the channel layout, per-token codes in the token layout)
        if req:
            idx = torch.arange(B, device=dev)
            pos = S + nc[:, None] * P + torch.arange(P, device=dev)[None]  # (B, P)
            if self.open16["k"]:
                s = qr @ self.open["k"].float().transpose(-1, -2)  # (B, H, R, P)
            else:
                self._grow(int(self.n_closed.max()) + 1)
                gather = lambda name: self.blocks[name][idx, :, nc]  # (B, H, P, ...): block nc of each sequence
                kc = unpack(gather("k_codes"), self.bits)  # (B, H, P, D)
                ksum = self._sums("k", kc, gather("k_sum") if self.cfg.summation_elimination else None)
                s = hm.scores_token_k(qr, kc, gather("k_mn"), gather("k_scale"), ksum, self.bits)  # (B, H, R, P)
            scores.append((s, pos, torch.arange(P, device=dev)[None] < fill[:, None]))
            vo = self.open["v"].float()
            values.append(lambda p, vo=vo: p @ vo)

        s_all = torch.cat([s for s, _, _ in scores], -1)  # (B, H, R, N)
        ok_all = key_mask(torch.cat([p for _, p, _ in scores], -1), torch.cat([o for _, _, o in scores], -1),
                          q_pos, window)  # (B, 1, R, N)
        prob = masked_softmax(s_all, ok_all)
        out = torch.zeros(B, H, G * Tq, D, device=dev)
        start = 0
        for (s, _, _), fn in zip(scores, values):
            n = s.shape[-1]
            out += fn(prob[..., start:start + n])
            start += n
        return out.reshape(B, H, G, Tq, D).reshape(B, Hq, Tq, D).to(q.dtype)

    # ------------------------------------------------------------------------------------------ bytes
    def seq_bytes(self, b: int, send: bool = False) -> Bytes:
        """Exact bytes held for sequence b (or sent, with `send`: sums only if cfg.send_sums)."""
        H, D, P, G = self.kv_heads, self.head_dim, self.part, self.groups
        req, nc, fill = self.cfg.requant_elimination, int(self.n_closed[b]), int(self.fill[b])
        meta_b = torch.finfo(self.meta_dtype).bits // 8
        tail_b = torch.finfo(self.tail_dtype).bits // 8
        out = Bytes(fp16=2 * H * int(self.sink_fill[b]) * D * tail_b)
        keep_sums = self.cfg.summation_elimination and (self.cfg.send_sums or not send)
        for x in "kv":
            q_blocks = nc + (1 if fill and not req else 0)  # blocks with quantized per-channel params
            q_tokens = nc * P + (fill if (not req or not self.open16[x]) else 0)
            out.codes += H * self._code_bytes(x, q_tokens)
            if self.kind[x] == "per_token":
                out.meta += 2 * H * q_tokens * G * meta_b
            else:
                out.meta += 2 * H * q_blocks * D * meta_b
            if keep_sums:
                sb = self.blocks[f"{x}_sum"].element_size()
                out.sums += H * (q_tokens * G if x == "k" else q_blocks * D) * sb
            if req and self.open16[x]:
                out.fp16 += H * fill * D * tail_b
        return out

    def stored_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b) for b in range(self.batch)), Bytes())

    def transfer_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b, send=True) for b in range(self.batch)), Bytes())

    # ------------------------------------------------------------------------------------------ transfer
    def _extent(self, x: str, nc: int, fill: int) -> tuple[int, int]:
        """(quantized token slots, blocks with quantized per-channel params) of tensor x, as `seq_bytes` counts."""
        req = self.cfg.requant_elimination
        q_tokens = nc * self.part + (fill if (not req or not self.open16[x]) else 0)
        return q_tokens, nc + (1 if fill and not req else 0)

    def _per_slot(self, x: str, name: str) -> bool:
        """Whether tensor `name` (not v_codes, packed per block) has one entry per token slot (K's codes, per-token
        min/scale, K's sums over a channel group) rather than one per block (per-channel min/scale, V's sums)."""
        return name in ("k_codes", "k_sum") or (self.kind[x] == "per_token" and name != "v_sum")

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        """Sequence b's payload, exactly what `transfer_bytes` counts: packed codes and min/scale of the quantized
        tokens, the sums (if `send_sums`), the 16-bit sinks and open block. Shapes carry the counts."""
        nc, fill, sink = int(self.n_closed[b]), int(self.fill[b]), int(self.sink_fill[b])
        out = {}
        for x in "kv":
            q_tokens, q_blocks = self._extent(x, nc, fill)
            names = [f"{x}_codes", f"{x}_mn", f"{x}_scale"]
            if self.cfg.summation_elimination and self.cfg.send_sums:
                names.append(f"{x}_sum")
            for name in names:  # (H, q_tokens, ...) per token slot, or (H, q_blocks, D) per block
                t = self.blocks[name][b]
                if name == "v_codes":  # packed along each block's tokens: whole blocks, then a partial block's bytes
                    full, rem = divmod(q_tokens, self.part)
                    out[name] = t[:, :full].clone()  # (H, full, D, P*b/8)
                    if rem:
                        out["v_codes_part"] = t[:, full, :, :-(-rem * self.bits // 8)].clone()  # (H, D, bytes)
                else:
                    out[name] = (t.flatten(1, 2)[:, :q_tokens] if self._per_slot(x, name) else t[:, :q_blocks]).clone()
            if self.cfg.requant_elimination and self.open16[x]:
                out[f"{x}_open"] = self.open[x][b, :, :fill].clone()  # (H, fill, D)
            out[f"{x}_sinks"] = self.sinks[x][b, :, :sink].clone()  # (H, sink, D)
        return out

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        """Install a payload from `export_seq` into (empty) sequence b as it is: quantized pages stay quantized;
        sums not sent are rebuilt from the codes."""
        sink, q_k = state["k_sinks"].shape[1], state["k_codes"].shape[1]
        nc, fill = (q_k // self.part, state["v_open"].shape[1]) if "v_open" in state else divmod(q_k, self.part)
        self._grow(nc + 1)
        for x in "kv":
            q_tokens, q_blocks = self._extent(x, nc, fill)
            for name in (f"{x}_codes", f"{x}_mn", f"{x}_scale", f"{x}_sum"):
                if name not in state:
                    continue
                if name == "v_codes":  # whole blocks (H, full, D, P*b/8), then a partial block's bytes
                    full = state[name].shape[1]
                    self.blocks[name][b, :, :full] = state[name].to(self.device)
                    if "v_codes_part" in state:
                        self.blocks[name][b, :, full, :, :state["v_codes_part"].shape[-1]] = state["v_codes_part"].to(self.device)
                elif self._per_slot(x, name):
                    self.blocks[name][b].flatten(1, 2)[:, :q_tokens] = state[name].to(self.device)
                else:
                    self.blocks[name][b, :, :q_blocks] = state[name].to(self.device)
            if self.cfg.summation_elimination and f"{x}_sum" not in state:
                nb = -(-q_tokens // self.part)
                self._update_sums(b, x, 0, nb, self._unpack(x, self.blocks[f"{x}_codes"][b, :, :nb]))
            if f"{x}_open" in state:
                self.open[x][b, :, :fill] = state[f"{x}_open"].to(self.device)
            self.sinks[x][b, :, :sink] = state[f"{x}_sinks"].to(self.device)
        self.sink_fill[b], self.n_closed[b], self.fill[b] = sink, nc, fill
        self.lengths[b] = sink + nc * self.part + fill

    # ------------------------------------------------------------------------------------------ analysis
    def reconstruct(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K̂, V̂ (H, n, D) of sequence b as the store represents them. For tests and error analysis only:
        attention never calls this."""
        out = {}
        for x in "kv":
            parts = [self.sinks[x][b, :, :int(self.sink_fill[b])].float()]
            nc, fill = int(self.n_closed[b]), int(self.fill[b])
            for beta in range(nc):
                parts.append(self._dequantize_slots(b, x, beta, self.part))
            if fill:
                open16 = self.cfg.requant_elimination and self.open16[x]
                parts.append(self.open[x][b, :, :fill].float() if open16 else self._dequantize_slots(b, x, nc, fill))
            out[x] = torch.cat(parts, 1)
        return out["k"], out["v"]
