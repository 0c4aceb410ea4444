"""Compile the HACK decode kernel for sm_90 on any machine (no GPU; Triton ships ptxas and cuobjdump) and print its
registers, spills and the instruction mix of its main loop: how kernels/NOTES.md counted instructions per block.

    python -m hack_kernels.sass --operand fp16 --warps 2

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

CATEGORIES = {"mem": "LDG LDS STS BAR LDSM STSM LDGSTS", "mma": "HMMA IMMA", "shfl": "SHFL",
              "cvt": "F2FP PRMT I2FP F2I I2F F2F HADD2 HFMA2",
              "int": "IMAD IADD3 LEA LOP3 SHF VIADD IABS ISETP SEL MOV IMNMX",
              "flt": "FADD FMUL FFMA FMNMX FSEL FSETP MUFU FRND"}


def main_loop(sass: str) -> collections.Counter:
    """Instruction categories of the longest backward-branch loop body of a SASS listing."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]+)\*/\s+(.*?);", sass)]
    where = {a: i for i, (a, _) in enumerate(ins)}
    best = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in where:
            body = ins[where[int(m.group(1), 16)]:i + 1]
            best = body if len(body) > len(best) else best
    out = collections.Counter()
    for _, t in best:
        op = (t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0]
        out[next((k for k, v in CATEGORIES.items() if op in v.split()), "other")] += 1
    return out


def main(argv=None) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hack_kernels.decode import _decode_kernel

    p = argparse.ArgumentParser(prog="python -m hack_kernels.sass")
    p.add_argument("--operand", choices=["int8", "fp8", "fp16"], default="int8")
    p.add_argument("--layout", choices=["channel", "token"], default="channel")
    p.add_argument("--warps", type=int, default=2)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--partition", type=int, default=64)
    p.add_argument("--rows", type=int, default=4, help="query heads per KV head")
    p.add_argument("--blocks-per-iter", type=int, default=1, help="NB (channel layout, fp16 operands only)")
    a = p.parse_args(argv)
    D = 128
    G = D // min(a.partition, D)
    oper, dt = {"int8": (0, tl.int8), "fp8": (1, tl.float8e4nv), "fp16": (2, tl.float16)}[a.operand]
    rp = max(a.rows, 16 // G) if a.layout == "channel" else max(a.rows, 16)
    rp = max(rp, 16 // a.blocks_per_iter)
    consts = dict(R=a.rows, RP=rp, D=D, PI=a.partition, G=G, BITS=a.bits, SP=16, LAYOUT=int(a.layout == "token"),
                  OPER=oper, DT=dt, TDT=tl.bfloat16, ASM=True,
                  NB=a.blocks_per_iter)
    sig = {n: "*fp32" for n in "Q PO PM PL".split()}
    sig.update({n: "*u8" for n in "KC VC KSUM VSUM".split()}, **{n: "*fp16" for n in "KMN KSC VMN VSC".split()})
    sig.update({n: "*bf16" for n in "SK SV OK OV".split()}, **{n: "*i32" for n in "NCL FILL SFILL".split()})
    names = list(_decode_kernel.arg_names)
    sig = {n: sig.get(n, "i32") if n not in consts else "constexpr" for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    k = triton.compile(ASTSource(_decode_kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": a.warps})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    loop = main_loop(sass)
    print(f"triton {triton.__version__} {vars(a)}")
    print(next((line.strip() for line in res.splitlines() if "REG" in line), res))
    print(f"main loop: {sum(loop.values())} instructions per warp per block x {a.warps} warps; {dict(loop)}")


if __name__ == "__main__":
    main()
