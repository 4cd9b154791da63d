"""tools/gpu_sass.py: reading SASS (cuobjdump, nvdisasm and ptxas forms) and, with jax's
CUDA plugin, compiling the Triton and Mosaic GPU kernels for an H100 without one."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# SASS as cuobjdump prints it (sm_90): a loop whose end moves two of its loads (R4, the
# second half of the 64-bit load R6/R7), one register reloaded and then overwritten
# before its move (R5), and one never loaded (R12), with a register spilled and reloaded;
# a forward branch that is no loop.
_SASS = """
        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;          /* 0x0 */
        /*0010*/                   BRA 0x0050 ;                           /* 0x0 */
        /*0020*/                   MOV R9, R4 ;                           /* 0x0 */
        /*0030*/                   LDG.E R4, desc[UR4][R2.64] ;          /* 0x0 */
        /*0040*/                   LDG.E R5, desc[UR4][R2.64] ;          /* 0x0 */
        /*0050*/                   LDG.E.64 R6, desc[UR4][R2.64] ;       /* 0x0 */
        /*0060*/                   FFMA R5, R8, R8, R5 ;                 /* 0x0 */
        /*0070*/                   STG.E desc[UR4][R2.64], R5 ;          /* 0x0 */
        /*0074*/                   STL [R1+0x8], R9 ;                    /* 0x0 */
        /*0078*/                   LDL R9, [R1+0x8] ;                    /* 0x0 */
        /*0080*/                   MOV R10, R4 ;                          /* 0x0 */
        /*0090*/                   MOV R11, R5 ;                          /* 0x0 */
        /*00a0*/                   MOV R13, R7 ;                          /* 0x0 */
        /*00b0*/                   MOV R14, R12 ;                         /* 0x0 */
        /*00c0*/               @P0 BRA 0x30 ;                             /* 0x0 */
        /*00d0*/                   EXIT ;                                 /* 0x0 */
"""


def test_gpu_sass_counts_the_loops_moves_that_wait_for_its_loads(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_sass

    report = gpu_sass.loop_report(_SASS)
    zero = dict.fromkeys(["loop_tma_in", "loop_tma_out", "loop_lds", "loop_sts", "loop_waits"], 0)
    assert report == dict(loop=True, loop_ldg=3, loop_stg=1, loop_spills=2, waiting_moves=2, **zero)
    assert gpu_sass.loop_report(_SASS.replace("@P0 BRA 0x30", "NOP"))["loop"] is False
    usage = "Function linear_scan_gpu:\n  REG:255 STACK:632 SHARED:0 LOCAL:16 CONSTANT[0]:608"
    assert gpu_sass.resource_usage(usage) == dict(regs=255, stack=648)


# A Mosaic GPU kernel's shape: TMA copies and mbarrier waits in the time loop, and the
# waits' retry loops after the kernel's EXIT (the last branches back to the kernel's start:
# the longest backward branch, but not the time loop).
_MOSAIC_SASS = """
        /*0000*/                   SYNCS.ARRIVE.TRANS64 RZ, [UR4+0x30000], R4 ;
        /*0010*/                   UTMALDG.3D [UR8], [UR48] ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR6], R8 ;
        /*0030*/              @!P1 BRA 0x00c0 ;
        /*0040*/                   LDS R10, [R7] ;
        /*0050*/                   FFMA R15, R5, R24, R10 ;
        /*0060*/                   STS [R7], R15 ;
        /*0070*/                   UTMASTG.3D [UR12], [UR6] ;
        /*0080*/              @UP0 UTMALDG.3D [UR16], [UR6] ;
        /*0090*/               @P0 BRA 0x0020 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0x00b0 ;
        /*00c0*/                   SYNCS.PHASECHK.TRANS64 P1, [R11+URZ], R9 ;
        /*00d0*/              @!P1 BRA 0x00c0 ;
        /*00e0*/                   BRA 0x0000 ;
"""


def test_gpu_sass_finds_a_mosaic_kernels_time_loop_before_its_retry_loops(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_sass

    report = gpu_sass.loop_report(_MOSAIC_SASS)
    assert report == dict(loop=True, loop_ldg=0, loop_stg=0, loop_tma_in=1, loop_tma_out=1,
                          loop_lds=1, loop_sts=1, loop_waits=1, loop_spills=0,
                          waiting_moves=0)  # fmt: skip


def _nvdisasm(sass: str) -> str:
    """_SASS as nvdisasm prints it: branch targets named by labels, not addresses."""
    out = []
    for line in sass.splitlines():
        for address, label in (("0030", ".L_x_1"), ("0050", ".L_x_0")):
            if f"/*{address}*/" in line:
                out.append(f"{label}:")
        out.append(line.replace("BRA 0x0050", "BRA `(.L_x_0)").replace("BRA 0x30", "BRA `(.L_x_1)"))
    return "\n".join(out)


def test_gpu_sass_reads_nvdisasm_and_ptxas_as_it_reads_cuobjdump(monkeypatch, tmp_path, capsys):
    """The XLA compiler's path: SASS from nvdisasm (labels for branch targets), registers
    and stack from ptxas -v, and the plugin found in a folder or not at all."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_sass

    labelled = _nvdisasm(_SASS)
    assert "`(.L_x_1)" in labelled and "0x30" not in labelled
    assert gpu_sass.loop_report(labelled) == gpu_sass.loop_report(_SASS)
    verbose = (
        "ptxas info    : Compiling entry function 'linear_scan_gpu' for 'sm_90a'\n"
        "ptxas info    : Function properties for linear_scan_gpu\n"
        "    152 bytes stack frame, 148 bytes spill stores, 148 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 152 bytes cumulative stack size\n"
    )
    assert gpu_sass.ptxas_usage(verbose) == dict(regs=255, stack=152)
    with pytest.raises(ValueError, match="no register count"):
        gpu_sass.ptxas_usage("ptxas fatal   : Unresolved extern function")
    assert gpu_sass.find_plugin(str(tmp_path)) is None
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    assert gpu_sass.find_plugin(str(tmp_path)) == str(tmp_path)
    # Asked for XLA's compiler without the plugin, it says what to install, before lowering.
    monkeypatch.setattr(sys, "argv", ["gpu_sass.py", "--compiler", "xla",
                                      "--plugin", str(tmp_path / "jax_plugins")])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        gpu_sass.main()
    assert e.value.code == 2 and "jax-cuda12-plugin" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("LRULM_JAX_CUDA_PLUGIN"),
    reason="needs jax's CUDA plugin in $LRULM_JAX_CUDA_PLUGIN (.ci/run installs it)",
)
def test_gpu_sass_compiles_the_kernels_with_xla_for_an_h100_without_one(tmp_path):
    """XLA's own GPU pipeline (deviceless, for an H100) on the default's loop and on
    pingpong's: neither spills; the default's loop ends in moves that wait for the chunk
    just loaded (one chunk in flight), pingpong's has none and twice the loads. At 32
    load registers, a quarter of the default's 128: the same loops, unrolled a quarter
    as far, which XLA compiles in ~14 s here (64: ~33 s; 128: ~100 s a kernel pair; the
    sweep's rows at full size: gpu_sass.py)."""
    result = subprocess.run(
        [sys.executable, "tools/gpu_sass.py", "--shape", "2,512,64", "--jobs", "2",
         "--tunings", "32,1,32,prefetch 32,1,32,pingpong", "--out", str(tmp_path),
         "--json", str(tmp_path / "rows.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.load(open(tmp_path / "rows.json"))
    assert rows["compiler"] == "xla"
    by = {(r["tuning"], r["kernel"]): r for r in rows["rows"]}
    assert sorted(by) == sorted(
        (t, k) for t in ("32,1,32,prefetch", "32,1,32,pingpong") for k in ("forward", "backward")
    ), rows
    for (tuning, _), r in by.items():
        assert r["stack"] == 0 and r["loop_spills"] == 0 and r["regs"] <= 255, r
        pingpong = tuning.endswith("pingpong")
        # forward: 32 load registers = two chunks of b (re, im); backward: of dh and h
        assert r["loop_ldg"] == (32 if pingpong else 16), r
        assert (r["waiting_moves"] == 0) == pingpong, r
    assert "| 32,1,32,pingpong | forward |" in result.stdout


@pytest.mark.skipif(
    not os.environ.get("LRULM_JAX_CUDA_PLUGIN"),
    reason="needs jax's CUDA plugin in $LRULM_JAX_CUDA_PLUGIN (.ci/run installs it)",
)
def test_gpu_sass_compiles_the_mosaic_gpu_kernels_for_an_h100_without_one(tmp_path):
    """The Mosaic GPU kernels through the plugin's whole compile (Mosaic's passes, LLVM's
    PTX, ptxas for sm_90a, the host launcher linked), as XLA instantiates them for an
    H100: with resets (float32), and with a full complex a (bfloat16), one and two halves.
    Each kernel: no spills, no Triton fallback, no global load or store in the time loop
    (all through TMA), each stream copied in once a chunk (halves: once a half), h or g
    copied out, and one mbarrier wait a chunk."""
    cases = {
        "resets": ["--resets", "--tunings", "mosaic,32,6 mosaic,32,6,halves=2"],
        "full_a": ["--full_a", "--dtype", "bfloat16",
                   "--tunings", "mosaic,64,3 mosaic,16,4,halves=2"],
    }  # fmt: skip
    # Streams in (planes, + the keep mask with resets): forward b (+ a), backward dh and h
    # (with a full a: dh and a; its da is an XLA fusion after the kernel).
    streams = {("resets", "forward"): 3, ("resets", "backward"): 5,
               ("full_a", "forward"): 4, ("full_a", "backward"): 4}  # fmt: skip
    for case, flags in cases.items():
        result = subprocess.run(
            [sys.executable, "tools/gpu_sass.py", "--shape", "2,512,256", "--jobs", "2", *flags,
             "--out", str(tmp_path / case), "--json", str(tmp_path / f"{case}.json")],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        rows = json.load(open(tmp_path / f"{case}.json"))["rows"]
        tunings = flags[-1].split()
        assert sorted((r["tuning"], r["kernel"]) for r in rows) == sorted(
            (t, k) for t in tunings for k in ("forward", "backward")
        ), rows
        for r in rows:
            halves = 2 if r["tuning"].endswith("halves=2") else 1
            planes_in = streams[case, r["kernel"]] - (case == "resets")  # keep: one copy a chunk
            assert r["code"] == "mosaic" and r["stack"] == 0 and r["loop_spills"] == 0, r
            assert r["loop_ldg"] == r["loop_stg"] == 0, r
            assert r["loop_tma_in"] == planes_in * halves + (case == "resets"), r
            assert r["loop_tma_out"] == 2 * halves and r["loop_waits"] == 1, r


def test_gpu_sass_captures_each_kernels_triton_ir_as_a_gpu_host_lowers_it(monkeypatch):
    """The Triton IR the tool compiles: the forward and the backward kernel of the tuning
    asked for (pingpong: twice prefetch's loads), the launch it names, the environment
    left as it was."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_sass

    from lrulm.kernels import gpu

    monkeypatch.delenv(gpu.TUNING_ENV, raising=False)
    loads = {}
    for tuning in ("32,1,128,prefetch", "32,1,128,pingpong", "64,2,64,stages=3"):
        modules = gpu_sass.capture(tuning, (2, 512, 64), resets=True)
        assert [m["name"] for m in modules] == ["linear_scan_gpu", "linear_scan_gpu_bwd"]
        t = gpu.Tuning.parse(tuning)
        assert all((m["num_warps"], m["num_stages"]) == (t.warps, t.stages) for m in modules)
        loads[tuning] = [m["ttir"].count("tt.load") for m in modules]
    assert gpu.TUNING_ENV not in os.environ
    prefetch, pingpong = loads["32,1,128,prefetch"], loads["32,1,128,pingpong"]
    assert all(1.7 < y / x < 2.3 for x, y in zip(prefetch, pingpong)), loads
    with pytest.raises(SystemExit, match="only Triton"):
        gpu_sass.capture("mosaic,32,6", (2, 512, 128), resets=False)
    # Without Triton (not an lrulm dependency) it says what to install, before lowering.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(sys, "argv", ["gpu_sass.py", "--compiler", "triton"])
    with pytest.raises(SystemExit, match="pip install triton"):
        gpu_sass.main()


def test_gpu_sass_names_the_error_and_checks_its_arguments(monkeypatch, tool_here):
    """A failed compile's row names its error (not jax's note on filtered frames that
    ends the traceback); a bad tuning, shape or plugin folder is a usage error."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import gpu_sass

    stderr = (
        "Traceback (most recent call last):\n  ...\n"
        "ValueError: LRULM_PALLAS_GPU_TUNING='x': expected CHANNELS,WARPS,...\n"
        "--------------------\n"
        "For simplicity, JAX has removed its internal frames from the traceback\n"
    )
    assert gpu_sass._child_error(stderr).startswith("ValueError: LRULM_PALLAS_GPU_TUNING='x'")
    assert gpu_sass._child_error("killed\n") == "killed"
    for args, message in (
        (["--tunings", "bogus"], "--tunings: LRULM_PALLAS_GPU_TUNING='bogus': expected"),
        (["--shape", "1,2"], "--shape takes B,L,N"),
        (["--plugin", "/nonexistent"], "/nonexistent: no jax CUDA plugin there"),
    ):
        run = tool_here("tools/gpu_sass.py", *args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr[-1000:])
