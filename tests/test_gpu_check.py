"""The GPU path checked from the CPU: every Triton kernel variant compiles for sm_80 and sm_90 (triton bundles
ptxas), the paper config takes a pre-training and a fine-tuning step at batch 1, the model has no graph breaks
under torch.compile, and the CPU-visible parts of tests/gpu_check.py (its search, its report, part 5's row, its
refusal without a GPU) work."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import slvp
import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import gpu_check  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu_check.py"), "--parts", "1", "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text().count("\n## ") == 1                              # part 1 alone
    head = out.read_text().split("\n## ")[0]          # the machine: this process's cores, not the host's count
    assert f"no GPU, torch {torch.__version__}" in head and f"; {len(os.sched_getaffinity(0))} CPU cores" in head
    rows = re.findall(r"\| (_\w+_kernel) \| (sm_\d+) \| (\d+) \| (\d+) \| (\d+) \|", out.read_text())
    # 3 dtypes x WIDE; x IMAGE_GRAD; x (no mask + 4 mask dtypes) x FLOW_GRAD, each for both targets
    expected = {"_warp_fwd_kernel": 6, "_warp_bwd_kernel": 12, "_photometric_kernel": 60}
    assert {(k, a): int(n) for k, a, n, _, _ in rows} == {(k, a): n for k, n in expected.items()
                                                          for a in ("sm_80", "sm_90")}
    for kernel, arch, _, regs, spills in rows:
        assert 0 < int(regs) <= 255 and int(spills) == 0, (kernel, arch, regs, spills)


def test_kernel_variants_cover_the_launchers_flags():
    pytest.importorskip("triton")
    variants = gpu_check.kernel_variants()
    photometric = [(sig, c) for name, sig, c in variants if name == "_photometric_kernel"]
    assert {sig["mask_ptr"] for sig, c in photometric if c["HAS_MASK"]} == {"*u8", "*fp32", "*fp16", "*bf16"}
    assert {(c["WIDE"], c["HAS_MASK"], c["FLOW_GRAD"]) for _, c in photometric} == {
        (w, m, g) for w in (False, True) for m in (False, True) for g in (False, True)}
    assert {sig["si_h"] for sig, c in photometric} == {"i32", "i64"}          # 64-bit strides with WIDE
    assert all(set(sig) == set(gpu_check.fw._photometric_kernel.arg_names) for sig, _ in photometric)


def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    r = subprocess.run([sys.executable, str(ROOT / "tests/gpu_check.py"), "--out", str(tmp_path / "r.md")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "error: no CUDA GPU" in r.stderr
    for parts in ("3", "1,5"):
        with pytest.raises(SystemExit, match="no CUDA GPU: parts 2-5"):
            gpu_check.main(["--parts", parts, "--out", str(tmp_path / "r.md")])


@pytest.mark.parametrize("parts", ["6", "0,1", "x", "", "1,,2"])
def test_gpu_check_parts_are_checked(parts, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--parts", parts])
    assert e.value.code == 2 and f"--parts {parts}: expected numbers from 1 to 5" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--batch-size"])
def test_gpu_check_counts_are_checked(flag, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([flag, "0"])
    assert e.value.code == 2 and f"error: argument {flag}: got '0', expected an integer >= 1" in capsys.readouterr().err


def test_part_5_alone_measures_its_step_alone_row(tmp_path, monkeypatch):
    """--parts 5 compares train.py with the eager pre-training step of part 4: measured for it when part 4 is not
    run (it ended FAILED, 'part 4 failed'), taken from part 4 when it is (not measured twice)."""
    calls, given = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a stand-in GPU")
    monkeypatch.setattr(gpu_check, "train_benchmark", lambda mode, b, s, c, tmp, search=True:
                        calls.append((mode, c, search)) or {"stage": mode, "clips/s": 10.0})
    monkeypatch.setattr(gpu_check, "end_to_end", lambda b, s, tmp, step_row: given.append(step_row) or
                        {"loader keeps up": "yes"})
    gpu_check.main(["--parts", "5", "--out", str(tmp_path / "r.md")])
    assert calls == [("pretrain", False, False)] and given == [{"stage": "pretrain", "clips/s": 10.0}]   # no search
    calls.clear()
    gpu_check.main(["--parts", "4,5", "--out", str(tmp_path / "r.md")])
    assert calls == [("pretrain", False, True), ("pretrain", True, True), ("finetune", False, True),
                     ("finetune", True, True)]
    assert given[-1] == {"stage": "pretrain", "clips/s": 10.0} and "All checks passed" in (tmp_path / "r.md").read_text()


def test_a_failed_check_fails_the_run_and_a_hung_kernel_test_its_section(tmp_path, monkeypatch):
    """A check that fails (here part 5's row: 0.5x the step alone) is in the report as FAILED and ends the run with
    exit status 1 and a line naming it, the other parts reported; tests/test_flow_warp.py still running after its
    time limit (subprocess.run's TimeoutExpired) is a FAILED section of its own, not a hang of the whole check."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a stand-in GPU")
    monkeypatch.setattr(gpu_check, "train_benchmark", lambda *a, **k: {"stage": "pretrain", "clips/s": 10.0})
    monkeypatch.setattr(gpu_check, "end_to_end", lambda *a: {"loader keeps up": "FAILED: 0.50x the step alone"})
    out = tmp_path / "r.md"
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--parts", "4,5", "--out", str(out)])
    assert str(e.value.code).startswith("error: 1 check(s) failed: train.py, paper config"), e.value.code
    report = out.read_text()
    assert "FAILED: 0.50x the step alone" in report and report.count("| pretrain |") == 4     # part 4's 4 sections
    assert "All checks passed" not in report

    def hang(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])
    monkeypatch.setattr(gpu_check.subprocess, "run", hang)
    text, failed = gpu_check.run_sections([("kernels", gpu_check.kernel_tests)], "# head\n", tmp_path / "k.md")
    assert failed == ["kernels"] and "**FAILED**: `TimeoutExpired: Command" in text and "timed out after 300" in text


def test_the_reports_folder_is_made(tmp_path, monkeypatch):
    """--out in a folder not made yet: the check makes it (c97e45e) before the first part, whose report is written
    after it; without it the run ended in a FileNotFoundError after its first part."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a stand-in GPU")
    monkeypatch.setattr(gpu_check, "train_benchmark", lambda *a, **k: {"stage": "pretrain", "clips/s": 10.0})
    monkeypatch.setattr(gpu_check, "end_to_end", lambda *a: {"loader keeps up": "yes"})
    out = tmp_path / "reports" / "today" / "r.md"
    gpu_check.main(["--parts", "5", "--out", str(out)])
    assert "All checks passed" in out.read_text()


def test_kernel_variants_have_the_signatures_the_launchers_use(monkeypatch):
    """Each launch of the three kernels (every dtype, mask dtype and flag; 32-bit offsets) passes the argument types
    of a variant that part 1 compiles: pointers by their tensors' dtypes, integers 32-bit, 1 / count fp32."""
    pytest.importorskip("triton")
    fw = gpu_check.fw
    names = ("_warp_fwd_kernel", "_warp_bwd_kernel", "_photometric_kernel")
    arg_names = {n: getattr(fw, n).arg_names for n in names}
    compiled = {}                                     # (kernel, constexprs) -> the signatures, one per dtype
    for n, sig, c in gpu_check.kernel_variants():
        compiled.setdefault((n, json.dumps(c, sort_keys=True)), []).append(
            {k: t for k, t in sig.items() if t != "constexpr"})
    launches = []

    class Recorder:                                   # kernel[grid](*args, **constexprs): recorded, not run
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, args, kw))
    for n in names:
        monkeypatch.setattr(fw, n, Recorder(n))
    for dtype in fw.TRITON_DTYPES:
        image, flow, target = (torch.rand(1, c, 4, 5).to(dtype) for c in (3, 2, 3))
        fw._launch_warp_fwd(image, flow)
        for image_grad in (False, True):
            fw._launch_warp_bwd(image, flow, target, image_grad)
        for m in (None, *fw.MASK_DTYPES):
            mask = None if m is None else torch.ones(1, 1, 4, 5, dtype=m).expand(1, 3, 4, 5)
            if m == torch.bool:
                mask = mask.view(torch.uint8)         # as photometric_loss passes a bool mask
            for flow_grad in (False, True):
                fw._launch_photometric(image, flow, target, mask, flow_grad)
    assert len(launches) == 3 * (1 + 2 + 6 * 2)
    typ = lambda v: ("*" + gpu_check.TRITON_TYPE[v.dtype] if isinstance(v, torch.Tensor) else
                     "fp32" if isinstance(v, float) else "i32")
    for name, args, kw in launches:
        constexprs = {k: v for k, v in kw.items() if k != "num_warps"}
        launched = {n: typ(a) for n, a in zip(arg_names[name], args)}
        assert launched in compiled[name, json.dumps(constexprs, sort_keys=True)], (name, launched)


def test_largest_batch_search():
    for limit_fit in (1, 5, 8, 9, 63, 64, 94, 1000):
        calls = []

        def fits(b):
            calls.append(b)
            return b <= limit_fit
        assert gpu_check.largest_batch(fits, start=8, limit=1024) == limit_fit
        assert len(calls) <= 20
    assert gpu_check.largest_batch(lambda b: False) == 0
    assert gpu_check.largest_batch(lambda b: True, start=8, limit=100) == 100  # doubling stops at the limit
    assert gpu_check.largest_batch(lambda b: True, start=2048, limit=1024) == 1024   # a start above the limit


def test_out_of_memory_errors_of_every_kind_end_the_batch_search():
    """Near the limit the allocation that fails may be a library's own: the messages as torch 2.x raises them."""
    assert gpu_check.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu_check.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                                "`cublasCreate(handle)`"))
    assert gpu_check.out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert gpu_check.out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert not gpu_check.out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not gpu_check.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))


def test_report_records_failures_and_tables(tmp_path):
    def broken():
        raise RuntimeError("kernel mismatch: 3e-2")
    partly = [{"step ms": 12.5, "largest batch": gpu_check.failed_cell(RuntimeError("non-finite loss\nat step 2"))}]
    text, failed = gpu_check.run_sections([("works", lambda: [{"a": 1, "b": 0.123456}]), ("broken", broken),
                                           ("partly", lambda: partly)], "# head\n", tmp_path / "r.md")
    assert failed == ["broken", "partly"]
    assert "| 12.5 | FAILED: RuntimeError: non-finite loss |" in text
    assert "| a | b |\n|---|---|\n| 1 | 0.123 |" in text
    assert "## broken\n\n**FAILED**: `RuntimeError: kernel mismatch: 3e-2`" in text
    assert (tmp_path / "r.md").read_text() == text


def test_end_to_end_row_compares_train_py_with_the_step_alone(tmp_path, monkeypatch):
    """Part 5's row: train.py run for real in a process of its own (tiny config, 4 x 2 steps on the CPU), its folder
    removed after; clips/s = batch x the median it/s of its log windows after the first; against a step-alone row,
    FAILED under 0.9x (a train.py that logs given rates), and where part 4 left no row; a train.py error is a failed
    check naming train.py's error line, not the end of the report."""
    monkeypatch.delenv("TRITON_INTERPRET")       # the torch path of the warp: the interpreter is slow (SPEC §2)
    real = gpu_check.end_to_end(2, 2, tmp_path, None, config="tiny")
    assert real["workers"] == 0 and real["clips/s"] > 0 and real["loader keeps up"].startswith("FAILED: no step-alone")
    assert not (tmp_path / "train_py_tiny").exists()                               # its checkpoints are gone
    with pytest.raises(RuntimeError, match="^train.py: .*argument --config: invalid choice: 'huge'"):
        gpu_check.end_to_end(2, 2, tmp_path, None, config="huge")

    rates = (9.0, 6.0, 5.0, 1.0)  # the first window (the workers' start) left out, whatever it gives: median 5, mean 4

    def fake_train_py(argv):
        assert argv[argv.index("--steps") + 1] == "8" and argv[argv.index("--log-every") + 1] == "2"
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        lines = [{"kind": "train", "step": 2 * (i + 1), "it_per_s": r} for i, r in enumerate(rates)]
        lines.append({"kind": "eval", "step": 8, "epe": 1.0})
        (out / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(gpu_check, "run_train_py", fake_train_py)
    for ratio, keeps_up in ((0.91, "yes"), (0.89, "FAILED: 0.89x the step alone")):
        row = gpu_check.end_to_end(2, 2, tmp_path, {"clips/s": 10 / ratio})
        assert row["clips/s"] == 10 and row["x the step alone"] == pytest.approx(ratio)
        assert row["loader keeps up"] == keeps_up
    assert not (tmp_path / "train_py_paper").exists()
    rates = (9.0, 6.0)
    with pytest.raises(RuntimeError, match="train.py logged 2 training windows; expected 4"):
        gpu_check.end_to_end(2, 2, tmp_path, {"clips/s": 1.0})

    def failing_train_py(argv):  # stops after writing its checkpoints
        fake_train_py(argv)
        raise RuntimeError("train.py: error: non-finite loss at step 3")
    monkeypatch.setattr(gpu_check, "run_train_py", failing_train_py)
    with pytest.raises(RuntimeError, match="non-finite loss at step 3"):
        gpu_check.end_to_end(2, 2, tmp_path, {"clips/s": 1.0})
    assert not (tmp_path / "train_py_paper").exists()                          # removed after a failure too


def test_train_py_runs_in_a_process_of_its_own_under_a_time_limit(monkeypatch):
    """Part 5 starts train.py as a user does (this Python, the repository's train.py), and a run past its time limit
    is a failed check naming the limit."""
    calls = []

    def hung(cmd, **kw):
        calls.append((cmd, kw))
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])
    monkeypatch.setattr(gpu_check.subprocess, "run", hung)
    with pytest.raises(RuntimeError, match="^train.py: still running after 7 s; stopped$"):
        gpu_check.run_train_py(["--steps", "1"], timeout=7)
    (cmd, kw), = calls
    assert cmd == [sys.executable, str(gpu_check.ROOT / "train.py"), "--steps", "1"] and kw["timeout"] == 7


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_paper_config_trains_a_step_on_the_cpu(mode, spm_model, monkeypatch):
    """SLVPConfig.paper() shapes, random weights, a synthetic clip at 360x648, batch 1: the step of train.py
    gives a finite loss, gradients in the decoder and heads, none in frozen encoders, and moves the weights."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the warp's torch path: the interpreter is too slow at 360x648
    torch.manual_seed(0)
    cfg = slvp.SLVPConfig.paper()
    model = slvp.SLVP(cfg, "vision", "pretrain" if mode == "pretrain" else "rvos")
    if mode == "pretrain":  # the flow head starts at zero, which would stop the gradient to the decoder at step 1
        torch.nn.init.normal_(model.flow_head.weight, std=1e-3)
    ds = data.build_dataset("synthetic", None, "pretrain" if mode == "pretrain" else "train", cfg, train=True)
    batch = data.Collate(slvp.Tokenizer(spm_model), cfg.max_text_len)([ds[0]])
    assert batch["frames"].shape == (1, 4, 3, 360, 648)
    loss, _ = train.stage_loss(model, model, batch, "cpu")
    assert torch.isfinite(loss)
    loss.backward()
    heads = ("flow_head",) if mode == "pretrain" else ("box_head", "mask_head")
    for name in ("decoder", "E_pos", "E_tem", *heads):
        grads = [p.grad for p in getattr(model, name).parameters()] if isinstance(getattr(model, name), torch.nn.Module) \
            else [getattr(model, name).grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.text.parameters())                     # frozen in both stages
    vision_grads = [p.grad for p in model.vision.parameters()]
    if mode == "pretrain":                                                          # frozen in pre-training only
        assert all(g is None for g in vision_grads)
    else:
        assert all(g is not None for g in vision_grads)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    trainable, opt, sched = train.build_optimizer(model, train.parse_args(["--steps", "1", "--warmup", "1"]))
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.decoder.state_dict().items())


@pytest.mark.parametrize("fusion", ["vision", "language"])
@pytest.mark.parametrize("task", ["pretrain", "rvos"])
def test_model_compiles_without_graph_breaks(fusion, task):
    import torch._dynamo
    cfg = slvp.SLVPConfig.tiny()
    model = slvp.SLVP(cfg, fusion, task)
    ids, mask = torch.randint(3, 100, (2, 9)), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    explain = torch._dynamo.explain(model)(torch.rand(2, 4, 3, *cfg.frame_size), ids, mask)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons


# ---------------------------------------------------------------------------------- from a read of the CUDA-only paths

@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_synthetic_batches_carry_only_what_the_step_reads(mode, tmp_path, monkeypatch):
    """The largest-batch search repeats and pins each batch: a pre-training clip's flow, owner map and masks (1.4x its
    frames' bytes, never read by the step) made 6.5 instead of 2.7 GiB of pinned memory at batch 256."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)      # no CUDA here: pinning is a no-op
    batch = gpu_check.synthetic_batch(slvp.SLVPConfig.tiny(), mode, 2, 3, tmp_path)
    assert set(batch) == {*train.STAGE_KEYS[mode], "ids", "mask"}
    assert batch["frames"].shape[0] == 3


def test_a_report_cut_short_names_the_sections_not_run(tmp_path):
    """Killed by a time limit mid-section (timeout's SIGKILL, the device's limit), the report on disk names every
    check it lacks, NOT RUN, and fails; a --deadline checked between sections left out the section running at the
    kill and all after it."""
    out, seen = tmp_path / "r.md", []

    def second():
        seen.append(out.read_text())  # what a kill now would leave
        return "done"
    text, failed = gpu_check.run_sections([("first", lambda: "done"), ("second", second), ("third", lambda: "done")],
                                          "# head\n", out)
    assert "## first\n\ndone" in seen[0]
    assert "## second\n\n**NOT RUN**" in seen[0] and "## third\n\n**NOT RUN**" in seen[0]
    assert seen[0].endswith("**FAILED**: the check did not finish\n")
    assert failed == [] and "NOT RUN" not in text and "## third\n\ndone" in text
