"""Compile the Triton kernels for an NVIDIA target without a GPU (run as a script).

TRITON_INTERPRET only checks semantics; constructs the real compiler rejects would pass it.
Lowering through TTIR/TTGIR/LLVM/PTX to a cubin with the ptxas bundled in the triton wheel
needs no driver, so it runs in CPU CI. Each variant's PTX then goes through that ptxas
once more with -v (triton discards its log) for the registers and spills per thread, which
decide how many programs fit on an SM. Prints one line per kernel variant and exits 0 on
success; a variant that spills fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "must run with the interpreter off"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_simclr, triton_weak  # noqa: E402

TYPES = {
    "src_ptr": "*u8", "scratch_ptr": "*fp32", "part_ptr": "*fp32", "ip_ptr": "*i32", "fp_ptr": "*fp32",
    "in_ptr": "*fp32", "w_ptr": "*fp32", "top_ptr": "*i32", "left_ptr": "*i32", "flip_ptr": "*i32",
    "m0": "fp32", "m1": "fp32", "m2": "fp32", "s0": "fp32", "s1": "fp32", "s2": "fp32",
}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def resources(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) of the PTX's kernel on sm_90a."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        # The flags triton's make_cubin passes (register allocation level included).
        res = subprocess.run([str(PTXAS), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src),
                              "-o", str(Path(d) / "k.o")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, log
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_variant(fn, out_type: str, constexprs: dict, num_warps: int):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "out_ptr":
            sig[name] = out_type
        else:
            sig[name] = TYPES.get(name, "i32")  # sizes and strides
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert len(k.asm["cubin"]) > 0
    regs, spills = resources(k.asm["ptx"])
    assert spills == 0, f"{fn.__name__} {constexprs}: {spills} bytes of register spills"
    print(fn.__name__, out_type, constexprs, f"warps={num_warps} regs={regs} spills={spills}", "ok", flush=True)
    return k


def main() -> int:
    sim = triton_simclr._simclr_kernel
    # 32 px, one program per image (the in-register contrast means), bicubic, hue on: the CIFAR
    # pretrain view, as triton_simclr launches it (BLOCK 1024, 8 warps).
    compile_variant(sim, "*bf16", dict(S=32, BLOCK=1024, N_TILES=1, PARTS=1, BICUBIC=True, DO_JITTER=True,
                                       DO_HUE=True), 8)
    # 224 px on the tile axis, 196 tiles of 256 pixels (8 warps): the ImageNet pretrain view (hue
    # on), its no-hue variants, and the RandomResizedCrop weak view (bilinear, fp32, no jitter code).
    tiled = dict(S=224, BLOCK=256, N_TILES=196, PARTS=256)
    hue = compile_variant(sim, "*bf16", dict(tiled, BICUBIC=True, DO_JITTER=True, DO_HUE=True), 8)
    no_hue = compile_variant(sim, "*bf16", dict(tiled, BICUBIC=True, DO_JITTER=True, DO_HUE=False), 8)
    compile_variant(sim, "*fp32", dict(tiled, BICUBIC=False, DO_JITTER=True, DO_HUE=False), 8)
    no_jit = compile_variant(sim, "*fp32", dict(tiled, BICUBIC=False, DO_JITTER=False, DO_HUE=False), 8)
    # The flags must remove the HSV code, not skip it at run time: floor() appears twice in the
    # resample (the tap positions) and three times per HSV round trip.
    floors = [k.asm["ttir"].count("math.floor") for k in (hue, no_hue, no_jit)]
    assert floors[0] > floors[1] == floors[2] == 2, floors
    # The contrast pre-pass at 224 px, with and without hue before contrast.
    pre = dict(S=224, BLOCK=256, N_TILES=196, BICUBIC=True)
    compile_variant(triton_simclr._contrast_luma_kernel, "*fp32", dict(pre, DO_HUE=True), 8)
    compile_variant(triton_simclr._contrast_luma_kernel, "*fp32", dict(pre, DO_HUE=False), 8)
    # Blur, 256-pixel programs at every size: the default per-sample kernels unroll K = 13
    # (sigma_max 2); 23 is a fixed kernel.
    compile_variant(triton_simclr._blur_pass, "*fp32", dict(S=224, K=23, BLOCK=256, VERTICAL=True, FINAL=False), 8)
    compile_variant(triton_simclr._blur_pass, "*fp16", dict(S=32, K=13, BLOCK=256, VERTICAL=False, FINAL=True), 8)
    for mode in range(4):
        compile_variant(triton_weak._crop_kernel, "*fp32",
                        dict(OUT_H=32, OUT_W=32, PAD=4, MODE=mode, HAS_PARAMS=True, BLOCK=1024), 8)
    compile_variant(triton_weak._crop_kernel, "*bf16",
                    dict(OUT_H=20, OUT_W=28, PAD=0, MODE=2, HAS_PARAMS=False, BLOCK=1024), 8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
