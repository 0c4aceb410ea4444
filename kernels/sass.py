"""Compile the HACK decode or prefill kernel for sm_90a on any machine (no GPU; Triton ships ptxas and cuobjdump) and
print its registers, spills, tensor-core instructions (HGMMA/QGMMA = wgmma, HMMA/IMMA = mma.sync) and the
instruction mix of its loops: how kernels/NOTES.md counted instructions per block.

    python -m hack_kernels.sass --operand fp16 --warps 2
    python -m hack_kernels.sass --kernel prefill --operand fp16 --block-rows 64 --warps 4 --stages 3

Use the Triton version of the GPU machine for numbers that match it (e.g. `pip install --target /tmp/t36
triton==3.6.0` and PYTHONPATH=/tmp/t36).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl

CATEGORIES = {"mem": "LDG LDS STS BAR LDSM STSM LDGSTS LDL STL", "mma": "HMMA IMMA HGMMA QGMMA IGMMA", "shfl": "SHFL",
              "cvt": "F2FP PRMT I2FP F2I I2F F2F HADD2 HFMA2 HMUL2",
              "int": "IMAD IADD3 LEA LOP3 SHF VIADD IABS ISETP SEL MOV IMNMX",
              "flt": "FADD FMUL FFMA FMNMX FSEL FSETP FRND", "mufu": "MUFU"}


def loops(sass: str) -> list[list[str]]:
    """The bodies (instruction texts) of the backward-branch loops of a SASS listing, in program order."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]+)\*/\s+(.*?);", sass)]
    where = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in where:
            out.append([t for _, t in ins[where[int(m.group(1), 16)]:i + 1]])
    return out


def opcode(t: str) -> str:
    return (t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0]


def mix(body: list[str]) -> collections.Counter:
    """Instruction categories of a loop body."""
    return collections.Counter(next((k for k, v in CATEGORIES.items() if opcode(t) in v.split()), "other")
                               for t in body)


def main_loop(sass: str) -> collections.Counter:
    """Instruction categories of the longest backward-branch loop body of a SASS listing."""
    return mix(max(loops(sass), key=len, default=[]))


def compile_sm90(kernel, sig: dict, consts: dict, options: dict) -> tuple[str, str]:
    """cuobjdump's resource usage (plus the dynamic shared memory and ptxas's wgmma warnings) and the SASS of `kernel`
    compiled for sm_90a. sig: pointer types by name (ints default to i32), consts: the constexprs; pointers get the
    16-byte alignment attribute the JIT adds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    sig = {n: sig.get(n, "i32") if n not in consts else "constexpr" for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    k = triton.compile(ASTSource(kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.cubin", "wb") as f:
            f.write(k.asm["cubin"])
        with open(f"{d}/k.ptx", "w") as f:
            f.write(k.asm["ptx"])
        run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True)
        res = run(f"{tools}/cuobjdump", "-res-usage", f"{d}/k.cubin").stdout
        sass = run(f"{tools}/cuobjdump", "-sass", f"{d}/k.cubin").stdout
        log = run(f"{tools}/ptxas", "-lineinfo", "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/x.cubin").stderr
    res = next((line.strip() for line in res.splitlines() if "REG" in line), res)
    warn = sorted({m.split(" in the function")[0] for m in re.findall(r"\(C75\d\d\)[^\n]*", log)})
    return f"{res} dynamic shared {k.metadata.shared} B; ptxas: {'; '.join(warn) or 'wgmma not serialized'}", sass


def prefill(a) -> None:
    """The prefill kernel of a.operand (fp16: the large-tile kernel; int8/fp8: the small-tile one), Llama-8B shape
    (4 query heads a KV head, head dim 128), bf16 q, sinks and open block: its loops with their instructions per warp
    per closed block of Π keys and a.block_rows query rows."""
    from hack_kernels.prefill import _prefill_fast_kernel, _prefill_kernel

    D = 128
    G = D // min(a.partition, D)
    oper, dt = {"int8": (0, tl.int8), "fp8": (1, tl.float8e4nv), "fp16": (2, tl.float16)}[a.operand]
    fast = a.operand == "fp16"  # as hack_prefill picks
    kernel = _prefill_fast_kernel if fast else _prefill_kernel
    consts = dict(R=a.rows, RPAD=a.rows, BM=a.block_rows, D=D, PI=a.partition, G=G, BITS=a.bits, SP=16, DT=dt,
                  TDT=tl.bfloat16, ASM=True, **({"GP": 1 << G.bit_length()} if fast else {"OPER": oper}))
    sig = {"Q": "*bf16" if fast else "*fp32", "OUT": "*bf16", "QSCALE": "fp32",
           **{n: "*u8" for n in "KC VC KSUM VSUM".split()},
           **{n: "*fp16" for n in "KMN KR KSC VMN VMX VSC VST".split()},
           **{n: "*bf16" for n in "SK SV OK OV".split()}, **{n: "*i32" for n in "NCL FILL SFILL QPOS".split()}}
    res, sass = compile_sm90(kernel, sig, consts, {"num_warps": a.warps, "num_stages": a.stages})
    print(f"triton {triton.__version__} prefill {vars(a)}")
    print(res)
    print(f"tensor-core instructions in the kernel: {dict(collections.Counter(re.findall(r'([HIQ]G?MMA)[.]', sass)))}")
    kinds = [("closed blocks, 2 a step", 2), ("closed blocks, the odd one", 1), ("diagonal blocks", 1)] if fast else \
        [("blocks, masked", 1)]
    for (name, nb), body in zip(kinds, (b for b in loops(sass) if len(b) >= 100)):
        ops = collections.Counter(opcode(t) for t in body)
        print(f"loop over {name}: {len(body)} instructions per warp a step ({len(body) / nb:.0f} a block) x "
              f"{a.warps} warps; {dict(mix(body))}")
        print("   ", " ".join(f"{op}:{n}" for op, n in ops.most_common()))


def main(argv=None) -> None:
    from hack_kernels.decode import _decode_kernel

    p = argparse.ArgumentParser(prog="python -m hack_kernels.sass")
    p.add_argument("--kernel", choices=["decode", "prefill"], default="decode")
    p.add_argument("--block-rows", type=int, default=64, help="prefill: query rows a program (BM)")
    p.add_argument("--stages", type=int, default=2, help="prefill: num_stages")
    p.add_argument("--operand", choices=["int8", "fp8", "fp16"], default="int8")
    p.add_argument("--layout", choices=["channel", "token"], default="channel")
    p.add_argument("--warps", type=int, default=2)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--partition", type=int, default=64)
    p.add_argument("--rows", type=int, default=4, help="query heads per KV head")
    p.add_argument("--blocks-per-iter", type=int, default=1, help="NB (channel layout, fp16 operands only)")
    a = p.parse_args(argv)
    if a.kernel == "prefill":
        return prefill(a)
    D = 128
    G = D // min(a.partition, D)
    oper, dt = {"int8": (0, tl.int8), "fp8": (1, tl.float8e4nv), "fp16": (2, tl.float16)}[a.operand]
    rp = max(a.rows, 16 // G) if a.layout == "channel" else max(a.rows, 16)
    rp = max(rp, 16 // a.blocks_per_iter)
    consts = dict(R=a.rows, RP=rp, D=D, PI=a.partition, G=G, BITS=a.bits, SP=16, LAYOUT=int(a.layout == "token"),
                  OPER=oper, DT=dt, TDT=tl.bfloat16, ASM=True,
                  NB=a.blocks_per_iter)
    sig = {n: "*fp32" for n in "PO PM PL".split()} | {"Q": "*bf16", "QSCALE": "fp32"}
    sig.update({n: "*u8" for n in "KC VC KSUM VSUM".split()}, **{n: "*fp16" for n in "KMN KSC VMN VSC".split()})
    sig.update({n: "*bf16" for n in "SK SV OK OV".split()}, **{n: "*i32" for n in "NCL FILL SFILL".split()})
    res, sass = compile_sm90(_decode_kernel, sig, consts, {"num_warps": a.warps})
    loop = main_loop(sass)
    print(f"triton {triton.__version__} {vars(a)}")
    print(res)
    print(f"main loop: {sum(loop.values())} instructions per warp per block x {a.warps} warps; {dict(loop)}")


if __name__ == "__main__":
    main()
