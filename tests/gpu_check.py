"""
Every GPU figure of the project in one command, on a machine with a CUDA GPU:

    python tests/gpu_check.py                    # writes gpu_check.md and prints it; exit 1 if any check failed

1. every Triton kernel variant compiled ahead of time for sm_80 and sm_90 (registers and spills from ptxas);
2. the kernel tests (tests/test_flow_warp.py) compiled on the GPU, without the interpreter, and the fused loss
   against the float64 torch reference on 8 x 3 frames of 360x648 (fp32 and bf16 inputs);
3. the kernel benchmark of flow_warp_triton.py (eager, torch.compile, fused; fwd and fwd+bwd; GB/s, % of copy;
   timed with the host's work and, eager and fused, as CUDA graph replays);
4. pre-training and fine-tuning of the paper config (random weights, synthetic clips, bf16 autocast), eager and
   with torch.compile: step time, clips/s, peak memory, MFU, and (eager) the largest batch that fits;
5. train.py itself on the paper config, in a process of its own, its DataLoader workers making the clips: clips/s
   against the step alone.

A failed check is written into the table as FAILED with its error and makes the exit status 1: nothing is skipped.
`--parts` runs some of them (`--parts 3` times the kernel again after a change). Part 1 needs no GPU:
`python tests/gpu_check.py --parts 1` runs it on any machine with triton (CI does).
"""
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # compiled kernels, never the interpreter: triton reads this when it is imported
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import data  # noqa: E402
import flow_warp_triton as fw  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# 1. Ahead-of-time compilation: no GPU needed (triton bundles ptxas)
# ----------------------------------------------------------------------------------------------------------

TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8"}


def kernel_variants():
    """Every (kernel name, signature, constexprs) the launchers of flow_warp_triton.py can request, for inputs of
    one dtype: WIDE (64-bit in-plane offsets, with 64-bit strides), IMAGE_GRAD, HAS_MASK with each mask dtype
    (bool is read as uint8), FLOW_GRAD. The warp's gradient buffers, the partial sums and the count are fp32; the
    fused loss writes its flow gradient in the flow's dtype (without FLOW_GRAD its pointer is the fp32 partial
    sums'). Each is the generic variant: at run time triton also specializes integers equal to 1 (and notes
    multiples of 16), which compiles the same code with fewer unknowns."""
    out = []
    for dtype in fw.TRITON_DTYPES:
        t = "*" + TRITON_TYPE[dtype]
        for wide in (False, True):
            ints = "i64" if wide else "i32"

            def variant(name, ptrs, **flags):
                constexprs = {"BLOCK": fw.BLOCK, "WIDE": wide, **flags}
                sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "*fp32") if n.endswith("_ptr") else
                       "fp32" if n == "inv_count" else "i32" if n in ("C", "H", "W") else ints
                       for n in getattr(fw, name).arg_names}
                out.append((name, sig, constexprs))
            variant("_warp_fwd_kernel", {"img_ptr": t, "flow_ptr": t, "out_ptr": t})
            for image_grad in (False, True):
                variant("_warp_bwd_kernel", {"img_ptr": t, "flow_ptr": t, "gout_ptr": t}, IMAGE_GRAD=image_grad)
            for mask in [None] + [m for m in fw.MASK_DTYPES if m != torch.bool]:
                for flow_grad in (False, True):  # no mask: the image is passed as a placeholder pointer
                    variant("_photometric_kernel", {"img_ptr": t, "flow_ptr": t, "tgt_ptr": t,
                                                    "gflow_ptr": t if flow_grad else "*fp32",
                                                    "mask_ptr": t if mask is None else "*" + TRITON_TYPE[mask]},
                            HAS_MASK=mask is not None, FLOW_GRAD=flow_grad)
    return out


def compile_variant(job):
    """Compile one variant for one arch; returns (name, arch, cubin bytes, registers, spill bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    name, signature, constexprs, arch = job
    compiled = triton.compile(ASTSource(fn=getattr(fw, name), signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    cubin = compiled.asm["cubin"]
    if not cubin:
        raise RuntimeError(f"{name} {constexprs} for sm_{arch}: no cubin")
    # the compiled metadata has no register count before a GPU loads the kernel: ask triton's ptxas (-v)
    gpu = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        info = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", gpu, str(ptx), "-o", str(Path(d) / "k.o")],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return name, arch, len(cubin), regs, spills


def compile_all(archs=(80, 90)):
    """Compile every variant for every arch in parallel processes (TRITON_INTERPRET must be unset: compiled
    kernels are plain JIT functions). Returns one row per (kernel, arch)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled)")
    jobs = [(*v, arch) for v in kernel_variants() for arch in archs]
    with ProcessPoolExecutor(min(len(jobs), data.cpu_cores())) as pool:
        results = list(pool.map(compile_variant, jobs))
    rows = {}
    for name, arch, size, regs, spills in results:
        r = rows.setdefault((name, arch), {"kernel": name, "arch": f"sm_{arch}", "variants": 0, "max registers": 0,
                                           "spill bytes": 0})
        r["variants"] += 1
        r["max registers"] = max(r["max registers"], regs)
        r["spill bytes"] += spills
    return list(rows.values())


# ----------------------------------------------------------------------------------------------------------
# 2. The kernels on the GPU against the torch reference
# ----------------------------------------------------------------------------------------------------------

def kernel_tests(timeout=300):
    """tests/test_flow_warp.py on the GPU (TRITON_INTERPRET=0: compiled kernels on CUDA tensors); a hang ends in
    subprocess.TimeoutExpired after `timeout` seconds, a FAILED section, not the device time of the whole check."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_flow_warp.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    if r.returncode != 0:
        raise RuntimeError(f"tests/test_flow_warp.py on CUDA: {summary}\n{r.stdout[-3000:]}")
    return summary


def full_size_check(clips=8, frames=3, H=360, W=648):
    """The fused loss and its flow gradient on the benchmark's size against the float64 torch reference, for fp32
    and bf16 inputs (the reference gets the same rounded inputs). Flows keep their fractional part in [0.1, 0.9]
    (in bf16, rounded: [0.09, 0.91]), off whole pixels, where bilinear sampling is not differentiable."""
    assert fw.use_triton(torch.empty(1, 1, 1, 1, device="cuda")), "the Triton path is not taken on CUDA tensors"
    g = torch.Generator(device="cuda").manual_seed(0)
    B = clips * frames
    rows = []
    for dtype, loss_tol, grad_tol in ((torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-5, 1e-2)):
        image = torch.rand(B, 3, H, W, device="cuda", generator=g).to(dtype)
        target = torch.rand(B, 3, H, W, device="cuda", generator=g).to(dtype)
        flow = (torch.randint(-9, 10, (B, 2, H, W), device="cuda", generator=g)
                + 0.1 + 0.8 * torch.rand(B, 2, H, W, device="cuda", generator=g)).to(dtype)
        f = flow.clone().requires_grad_()
        loss = fw.photometric_loss(image, f, target)
        loss.backward()
        f64 = flow.double().requires_grad_()
        ref = fw.photometric_loss_reference(image.double(), f64, target.double())
        ref.backward()
        loss_err = abs(loss.item() - ref.item()) / ref.item()
        grad_err = ((f.grad.double() - f64.grad).norm() / f64.grad.norm()).item()
        rows.append({"dtype": str(dtype)[6:], "loss rel. error": loss_err, "flow-grad rel. error": grad_err,
                     "limits": f"{loss_tol:g} / {grad_tol:g}"})
        if not (loss_err < loss_tol and grad_err < grad_tol):
            raise RuntimeError(f"{dtype}: loss error {loss_err:.2e} (limit {loss_tol}), flow-gradient error "
                               f"{grad_err:.2e} (limit {grad_tol})")
    return rows


def benchmark_rows():
    copy_gbs, rows = fw.benchmark()
    return [{"copy GB/s": copy_gbs, **r} for r in rows]


# ----------------------------------------------------------------------------------------------------------
# 4. The paper config's training step
# ----------------------------------------------------------------------------------------------------------

def largest_batch(fits, start=8, limit=1024):
    """The largest b <= limit with fits(b), for a monotone fits: doubling from start, then bisection."""
    if not fits(1):
        return 0
    lo, hi, b = 1, None, min(start, limit)
    while hi is None and lo < limit:
        if fits(b):
            lo, b = b, min(2 * b, limit)
        else:
            hi = b
    if hi is None:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def out_of_memory(e):
    """An error saying the GPU's memory ran out: torch's allocator (OutOfMemoryError), or an allocation of its own by a
    library near the limit (cuBLAS or cuDNN: "..._STATUS_ALLOC_FAILED"; the CUDA runtime: "CUDA error: out of
    memory"). A batch that ends in one of them does not fit."""
    return isinstance(e, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(e) or "out of memory" in str(e)


def synthetic_batch(cfg, mode, n_clips, batch_size, tmp):
    """n_clips synthetic clips of the paper's size (captions or expressions tokenized by a sentencepiece model fit
    to them), tiled to batch_size, in pinned memory."""
    import data
    import train
    ds = data.build_dataset("synthetic", None, "pretrain" if mode == "pretrain" else "train", cfg, train=True)
    tokenizer = train.fit_tokenizer([ds], Path(tmp))
    # only what the step reads: a pre-training clip's flow, owner map and masks would add 1.4x its frames' bytes to
    # every batch repeated and pinned in the largest-batch search (6.5 instead of 2.7 GiB at batch 256)
    keys = train.STAGE_KEYS["pretrain" if mode == "pretrain" else "finetune"]
    batch = data.Collate(tokenizer, cfg.max_text_len, keys=keys)([ds[i] for i in range(n_clips)])
    reps = -(-batch_size // n_clips)
    return {k: v.repeat(reps, *[1] * (v.dim() - 1))[:batch_size].pin_memory()
            for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_benchmark(mode, batch_size, steps, compile_model, tmp, warmup=5, search=True):
    """Step time, clips/s, peak memory and MFU of the paper config's training step (random weights, vision as
    query, bf16 autocast, fused AdamW): the step of train.py, timed over `steps` steps after `warmup`; eager and
    with `search`, the largest batch that fits."""
    import slvp
    import train
    cfg = slvp.SLVPConfig.paper()
    model = slvp.SLVP(cfg, "vision", "pretrain" if mode == "pretrain" else "rvos").cuda()
    trainable, opt, sched = train.build_optimizer(model, SimpleNamespace(lr=1e-4, weight_decay=0.05, warmup=1,
                                                                         steps=warmup + steps))
    run = torch.compile(model) if compile_model else model
    batch = synthetic_batch(cfg, mode, min(batch_size, 8), batch_size, tmp)
    t_first = time.time()
    for i in range(warmup + steps):
        if i == 1:
            torch.cuda.synchronize()
            first_step_s = time.time() - t_first
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
        loss, _ = train.stage_loss(run, model, batch, "cuda")
        if not train.optimizer_step(loss, trainable, opt, sched, 1.0):     # the step train.py takes, its check included
            raise RuntimeError(f"{mode}: non-finite loss ({loss.item()}) or gradient at step {i}")
    torch.cuda.synchronize()
    dt = (time.time() - t0) / steps
    flops = train.train_flops(model, batch_size, batch["ids"].shape[1])
    row = {"stage": mode, "compile": "yes" if compile_model else "no", "batch": batch_size, "step ms": 1e3 * dt,
           "clips/s": batch_size / dt, "peak GiB": torch.cuda.max_memory_allocated() / 2 ** 30,
           "TFLOP/s": flops / dt / 1e12, "MFU %": 100 * flops / dt / peak if (peak := train.peak_flops()) else "",
           "first step s": first_step_s}

    def fits(b):
        try:
            big = synthetic_batch(cfg, mode, min(b, 8), b, tmp)
            for _ in range(2):
                loss, _ = train.stage_loss(run, model, big, "cuda")
                if not train.optimizer_step(loss, trainable, opt, sched, 1.0):
                    raise RuntimeError(f"{mode}: non-finite loss ({loss.item()}) or gradient at batch {b}")
            torch.cuda.synchronize()
            return True
        except RuntimeError as e:
            if out_of_memory(e):
                return False
            raise
        finally:
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    if search and not compile_model:  # batch sizes would each recompile the graph
        try:                   # an error in the search keeps the timed row, its cell FAILED
            row["largest batch"] = largest_batch(fits, start=batch_size)
        except Exception as e:
            traceback.print_exc()
            row["largest batch"] = failed_cell(e)
    del model, opt, run
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run_train_py(argv, timeout=900):
    """train.py in a process of its own, as a user runs it (in the check's process it once made 0.84x the step alone,
    in a process of its own on a second machine 0.98x-1.00x: README, "Performance"). Its output is the check's
    (stderr passed on after it ends); its error line (the last of its stderr) or a hang past `timeout` seconds, a
    RuntimeError."""
    try:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"train.py: still running after {timeout} s; stopped") from None
    print(r.stderr, end="", file=sys.stderr)
    if r.returncode:
        raise RuntimeError(f"train.py: {(r.stderr.strip().splitlines() or [f'exit status {r.returncode}'])[-1]}")


def end_to_end(batch_size, steps, tmp, step_row, config="paper"):
    """train.py as a user runs it (pre-training on synthetic clips, eager, its default --workers): 4 x `steps` steps,
    clips/s the median of its last three log windows of `steps` steps (the first holds the workers' start), data
    loading included (evaluation and checkpoint writing are not counted), against the step alone (`step_row`, the
    eager pre-training row of part 4; None where that failed). Under 0.9x of it the loader holds the GPU back: FAILED.
    A batch of the paper config's frames takes 10.7 MiB of /dev/shm a clip."""
    out = Path(tmp) / f"train_py_{config}"
    try:
        run_train_py(["--config", config, "--steps", str(4 * steps), "--batch-size", str(batch_size), "--log-every",
                      str(steps), "--eval-clips", "8", "--out", str(out), "--overwrite"])
        lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)          # the paper config's checkpoint and resume.pt: gigabytes
    windows = [line for line in lines if line["kind"] == "train"][1:]
    if len(windows) != 3:
        raise RuntimeError(f"train.py logged {len(windows) + 1} training windows; expected 4")
    mid = sorted(windows, key=lambda line: line["it_per_s"])[1]
    row = {"workers": data.default_workers(torch.cuda.is_available()), "batch": batch_size,
           "clips/s": batch_size * mid["it_per_s"], "MFU %": 100 * mid["mfu"] if "mfu" in mid else ""}
    if step_row is None:
        row["loader keeps up"] = "FAILED: no step-alone row to compare with (part 4's eager pre-training failed)"
        return row
    ratio = row["clips/s"] / step_row["clips/s"]
    row.update({"step alone, clips/s": step_row["clips/s"], "x the step alone": ratio,
                "loader keeps up": "yes" if ratio >= 0.9 else f"FAILED: {ratio:.2f}x the step alone"})
    return row


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------

def markdown_table(rows):
    """Rows of dicts (the first row's keys are the columns) as a Markdown table; floats to 3 significant digits."""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def error_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def failed_cell(e):
    """A table cell for an error that leaves the rest of its row measured; run_sections fails such a section."""
    return f"FAILED: {error_line(e)}"


def run_sections(sections, head, out):
    """[(title, function returning rows or a line)] -> (Markdown text, failed titles), written to `out` at the end
    and before each section, there with the sections not done yet as NOT RUN and a FAILED line, so that a check
    stopped by a time limit or a hang leaves a report that names what it lacks. A failure is recorded, not skipped:
    its section shows FAILED and the error, or a row its cell FAILED with the rest of the row; the caller exits
    non-zero."""
    parts, failed = [head], []
    for i, (title, fn) in enumerate(sections):
        pending = [f"## {t}\n\n**NOT RUN**: the check stopped before it was done\n" for t, _ in sections[i:]]
        Path(out).write_text("\n".join([*parts, *pending]) + "\n**FAILED**: the check did not finish\n")
        t = time.time()
        print(f"... {title}", file=sys.stderr, flush=True)
        try:
            result = fn()
            body = markdown_table(result) if isinstance(result, list) else str(result)
            if isinstance(result, list) and any(str(v).startswith("FAILED") for r in result for v in r.values()):
                failed.append(title)
        except Exception as e:  # recorded in the report and in the exit status, with the traceback on stderr
            traceback.print_exc()
            body = f"**FAILED**: `{error_line(e)}`"
            failed.append(title)
        parts.append(f"## {title}\n\n{body}\n\n({time.time() - t:.0f} s)\n")
    Path(out).write_text("\n".join(parts))
    return "\n".join(parts), failed


def main(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.md", type=data.path,
                   help="the Markdown report to write (default: %(default)s)")
    p.add_argument("--parts", default="1,2,3,4,5",
                   help="the parts to run, comma-separated (default: %(default)s): 1 kernels compiled ahead of "
                        "time (no GPU needed), 2 kernel tests on CUDA, 3 kernel benchmark, 4 training steps of the "
                        "paper config, 5 train.py end to end (against part 4's eager pre-training row, measured for "
                        "it when 4 is not among the parts)")
    p.add_argument("--steps", type=data.number(int, 1), default=30,
                   help="timed training steps per row (default: %(default)s)")
    p.add_argument("--batch-size", type=data.number(int, 1), default=16,
                   help="clips per training step in the timed rows (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        parts = {int(x) for x in args.parts.split(",")}
    except ValueError:
        parts = set()
    if not parts or not parts <= {1, 2, 3, 4, 5}:
        p.error(f"--parts {args.parts}: expected numbers from 1 to 5, comma-separated")
    out = Path(args.out)   # written after each part: checked before the first
    if out.is_dir():
        p.error(f"--out {out} is a folder; expected the report's file name")
    if problem := data.cannot_write(out.parent):
        p.error(f"--out {out}: {problem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if parts - {1} and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU: parts 2-5 of the GPU check need one (--parts 1 runs the part that "
                         "does not)")
    tmp, timed = tempfile.mkdtemp(), {}

    def step_rows(mode, c):
        timed[mode, c] = train_benchmark(mode, args.batch_size, args.steps, c, tmp)
        return [timed[mode, c]]

    def step_alone():  # part 5's yardstick, part 4's eager pre-training row: timed here when part 4 is not run
        if 4 not in parts:
            return train_benchmark("pretrain", args.batch_size, args.steps, False, tmp, search=False)
        return timed.get(("pretrain", False))
    sections = [
        (1, "Kernels compiled ahead of time (ptxas -v)", compile_all),
        (2, "Kernel tests on CUDA, compiled (tests/test_flow_warp.py)", kernel_tests),
        (2, "Fused loss vs float64 reference, 8 x 3 frames of 360x648", full_size_check),
        (3, "Fused warp + loss benchmark, 8 x 3 frames of 360x648", benchmark_rows),
        *[(4, f"Paper config, {mode}, bf16, {'torch.compile' if c else 'eager'}",
           lambda mode=mode, c=c: step_rows(mode, c)) for mode in ("pretrain", "finetune") for c in (False, True)],
        (5, "train.py, paper config, pre-training, eager, data loading included",
         lambda: [end_to_end(args.batch_size, args.steps, tmp, step_alone())]),
    ]
    sections = [(title, fn) for part, title, fn in sections if part in parts]
    head = f"# GPU check\n\n`python tests/gpu_check.py` on {time.strftime('%Y-%m-%d')}: "
    gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no GPU"
    triton_version = fw.triton.__version__ if fw.triton else "not installed"   # macOS, Windows: the torch path
    head += f"{gpu}, torch {torch.__version__}, triton {triton_version}; {data.cpu_cores()} CPU cores"
    if os.path.isdir("/dev/shm"):  # part 5's DataLoader workers pass their batches through it (10.7 MiB a clip)
        head += f", /dev/shm {shutil.disk_usage('/dev/shm').free / 2**30:.1f} GiB free"
    head += "\n\n"
    body, failed = run_sections(sections, head, args.out)
    report = body + ("\n**FAILED**: " + "; ".join(failed) + "\n" if failed else "\nAll checks passed.\n")
    Path(args.out).write_text(report)
    print(report)
    if failed:
        raise SystemExit(f"error: {len(failed)} check(s) failed: {'; '.join(failed)} (details above and in {args.out})")


if __name__ == "__main__":
    main()
