"""Issue 15: bad input to train.py and eval.py (a file missing, empty, truncated or of the wrong kind; a flag out of
range, not finite, or contradicting another flag or the checkpoint) ends the program with a non-zero status and one
line `error: ...` naming the file or flag, never a traceback; a new run never replaces an earlier run's checkpoint.
The programs run in-process (main(argv)): any exception other than SystemExit fails the test with its traceback.
Every flag of the command lines says what it does and, where it has one, its default."""
import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import eval as ev
import gpu_check
import slvp
import train
from test_data import write_jpeg, write_video
from test_eval import square, write_ids
from test_train import ENV, FAST, ROOT, other_spm_model


def truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def ytvos_tree(root, meta):
    """Two videos of 6 frames with annotations, and `meta` (text) as the train and valid expression files."""
    for vid in ("vid_a", "vid_b"):
        write_video(root / "train/JPEGImages", root / "train/Annotations", vid, 6)
        write_video(root / "valid/JPEGImages", None, vid, 6)
    for split in ("train", "valid"):
        (root / f"meta_expressions/{split}").mkdir(parents=True)
        (root / f"meta_expressions/{split}/meta_expressions.json").write_text(meta)
    return root


@pytest.fixture(scope="module")
def d(tmp_path_factory, spm_model):
    """Every bad file of the table, made here, beside the good ones they spoil."""
    d = tmp_path_factory.mktemp("bad")
    cfg = dataclasses.replace(slvp.SLVPConfig.tiny(), frame_size=(48, 64), vocab_size=64)
    for name, model in (("good", slvp.SLVP(cfg, task="rvos")), ("pre", slvp.SLVP(cfg)),
                        ("small-vocab", slvp.SLVP(dataclasses.replace(cfg, vocab_size=8), task="rvos"))):
        slvp.save_checkpoint(d / f"{name}.safetensors", model)
    shutil.copy(spm_model, d / "spm.model")                       # the tokenizer next to every checkpoint but one
    (d / "no-spm").mkdir()
    shutil.copy(d / "pre.safetensors", d / "no-spm/pre.safetensors")
    (d / "no-spm/run").mkdir()                                      # a run's folder given for its checkpoint
    good = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[:len(good) // 2])
    (d / "empty.safetensors").touch()
    shutil.copy(spm_model, d / "spm-as-ckpt.safetensors")
    (d / "text.model").write_text("not a sentencepiece model")
    (d / "empty.model").touch()
    (d / "text.mp4").write_text("not a video")
    (d / "no-frames").mkdir()
    for t in range(3):                                              # a demo video, one frame truncated
        write_jpeg(d / f"frames/{t:03d}.jpg", 60 * t)
    truncate(d / "frames/001.jpg")
    for tree in ("davis", "davis-bad-gt"):                          # DAVIS trees and predictions, one PNG truncated
        for t in range(2):
            write_ids(d / f"{tree}/Annotations_unsupervised/480p/a/{t:05d}.png", square().astype(np.uint8))
        (d / f"{tree}/ImageSets/2017").mkdir(parents=True)
        (d / f"{tree}/ImageSets/2017/val.txt").write_text("a\n")
    for pred in ("pred", "pred-truncated"):
        for t in range(2):
            write_ids(d / f"{pred}/a/{t:05d}.png", square().astype(np.uint8))
    truncate(d / "pred-truncated/a/00001.png")
    truncate(d / "davis-bad-gt/Annotations_unsupervised/480p/a/00001.png")
    meta = {"videos": {v: {"expressions": {"0": {"exp": "the red square", "obj_id": "1"}}} for v in ("vid_a", "vid_b")}}
    ytvos_tree(d / "ytvos-not-json", '{"videos": ')
    ytvos_tree(d / "ytvos-no-expressions", json.dumps({"videos": {"vid_a": {"frames": ["00000"]}}}))
    ytvos_tree(d / "ytvos-not-utf8", "")
    for split in ("train", "valid"):
        (d / f"ytvos-not-utf8/meta_expressions/{split}/meta_expressions.json").write_bytes(b"\xff\xfe{}")
    no_obj = {"videos": {v: {"expressions": {"0": {"exp": "the red square"}}} for v in ("vid_a", "vid_b")}}
    ytvos_tree(d / "ytvos-no-obj-id", json.dumps(no_obj))      # valid as the download's valid split, not as train
    ytvos_tree(d / "ytvos-truncated-frame", json.dumps(meta))
    truncate(d / "ytvos-truncated-frame/train/JPEGImages/vid_b/00003.jpg")
    truncate(d / "ytvos-truncated-frame/valid/JPEGImages/vid_b/00003.jpg")
    (d / "ytvos-truncated-frame/meta_expressions/test").mkdir()                 # no test videos
    (d / "ytvos-truncated-frame/meta_expressions/test/meta_expressions.json").write_text('{"videos": {}}')
    ytvos_tree(d / "ytvos-truncated-annotation", json.dumps(meta))
    truncate(d / "ytvos-truncated-annotation/train/Annotations/vid_a/00002.png")
    (d / "t5").mkdir()
    (d / "t5/config.json").write_text("{not json")
    (d / "vit.bin").write_bytes(b"\x80\x02garbage")
    (d / "a-file").touch()
    (d / "sheet-folder.png").mkdir()
    (d / "no-resume").mkdir()
    (d / "bad-resume").mkdir()
    (d / "bad-resume/resume.pt").write_bytes(good[:100])
    (d / "text-resume").mkdir()                 # text: the weights-only unpickler reads 'h' as BINGET (a KeyError)
    (d / "text-resume/resume.pt").write_text("hello, not a resume state\n")
    (d / "text-vit.bin").write_text("hello, not weights\n")
    ytvos_tree(d / "ytvos-empty", json.dumps({"videos": {}}))                  # the folders there, no expression
    (d / "ytvos-empty/meta_expressions/test").mkdir()
    (d / "ytvos-empty/meta_expressions/test/meta_expressions.json").write_text('{"videos": {}}')
    shutil.copytree(d / "davis", d / "davis-empty-list")
    (d / "davis-empty-list/ImageSets/2017/val.txt").write_text("\n")
    return d


# (program, arguments, what the line must name): {d} is the folder of bad files, {good} a good checkpoint, {spm} its
# sentencepiece model; train.py cases get their own --out
CASES = [
    # checkpoints: missing, a folder, empty, truncated, of the wrong kind, the wrong stage, a vocabulary too small
    ("eval", "--bench synthetic --ckpt {d}/nowhere.safetensors", ["nowhere.safetensors: no such checkpoint"]),
    ("eval", "--bench synthetic --ckpt {d}/frames", ["frames: a folder, not a file", "expected a ckpt.safetensors"]),
    ("eval", "--bench synthetic --ckpt {d}/empty.safetensors", ["empty.safetensors: not a safetensors checkpoint"]),
    ("eval", "--bench synthetic --ckpt {d}/truncated.safetensors", ["truncated.safetensors: not a safetensors"]),
    ("eval", "--bench synthetic --ckpt {d}/spm-as-ckpt.safetensors", ["spm-as-ckpt.safetensors: not a safetensors"]),
    ("eval", "--bench synthetic --ckpt {d}/pre.safetensors", ["pre.safetensors is a pre-training checkpoint"]),
    ("eval", "--bench synthetic --ckpt {d}/small-vocab.safetensors", ["spm.model has", "more than the 8"]),
    ("train", "--mode finetune --init {d}/truncated.safetensors", ["truncated.safetensors: not a safetensors"]),
    ("train", "--mode finetune --init {d}/empty.safetensors", ["empty.safetensors: not a safetensors"]),
    ("train", "--mode finetune --encoders {d}/spm-as-ckpt.safetensors", ["spm-as-ckpt.safetensors: not a"]),
    ("train", "--mode finetune --init {d}/nowhere.safetensors --spm {spm}", ["nowhere.safetensors: no such"]),
    # ... named as such where no spm.model is beside it either (it was named by that: "no spm.model beside")
    ("train", "--mode finetune --init {d}/no-spm/nowhere.safetensors", ["no-spm/nowhere.safetensors: no such checkp"]),
    ("train", "--mode finetune --encoders {d}/no-spm/run", ["no-spm/run: a folder, not a file", "expected a ckpt.s"]),
    ("train", "--mode finetune --init {d}/pre.safetensors --fusion language", ["--fusion language but", "pre.safe"]),
    ("train", "--vit {d}/vit.bin --spm {spm}", ["vit.bin: not a pickle of tensors", "expected a .safetensors"]),
    ("train", "--t5 {d}/t5 --spm {spm}", ["t5/config.json: not JSON", "expected a T5 config"]),
    ("train", "--resume --out {d}/bad-resume", ["bad-resume/resume.pt: unreadable", "expected the resume.pt"]),
    ("train", "--resume --out {d}/no-resume", ["--resume but", "no-resume/resume.pt does not exist"]),
    ("train", "--out {d}/a-file", ["--out", "a-file is a file; expected a folder"]),
    # tokenizer models: not one, empty, missing
    ("eval", "--bench synthetic --ckpt {good} --spm {d}/text.model", ["text.model: not a sentencepiece"]),
    ("eval", "--bench synthetic --ckpt {good} --spm {d}/empty.model", ["empty.model: not a sentencepiece"]),
    ("eval", "--bench synthetic --ckpt {good} --spm {d}/none.model", ["none.model: no tokenizer"]),
    ("train", "--spm {d}/text.model", ["text.model: not a sentencepiece model"]),
    ("train", "--spm {d}/none.model", ["none.model: no such sentencepiece model"]),
    # frames and videos
    ("eval", "--ckpt {good} --video {d}/frames --text the --out {d}/demo", ["frames/001.jpg: unreadable image"]),
    ("eval", "--ckpt {good} --video {d}/text.mp4 --text the --out {d}/demo", ["text.mp4: unreadable video"]),
    ("eval", "--ckpt {good} --video {d}/no-frames --text the --out {d}/demo", ["no-frames: no .jpg/.png frames"]),
    ("eval", "--ckpt {good} --video {d}/none.mp4 --text the --out {d}/demo", ["none.mp4: no such video"]),
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-truncated-frame --spm {spm} --workers 1 "
              "--steps 4 --batch-size 2", ["vid_b/00003.jpg: unreadable image"]),              # mid-run, in a worker
    ("eval", "--bench ytvos --ckpt {good} --data-root {d}/ytvos-truncated-frame --workers 1 --out {d}/failed-w1",
     ["valid/JPEGImages/vid_b/00003.jpg: unreadable image"]),
    ("eval", "--bench ytvos --ckpt {good} --data-root {d}/ytvos-truncated-frame --workers 0 --out {d}/failed-w0",
     ["valid/JPEGImages/vid_b/00003.jpg: unreadable image"]),
    # annotations and prediction PNGs
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-truncated-annotation --spm {spm} "
              "--steps 4 --batch-size 2", ["vid_a/00002.png: unreadable annotation"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred-truncated",
     ["pred-truncated/a/00001.png: unreadable annotation"]),
    ("eval", "--bench davis17 --davis-root {d}/davis-bad-gt --predictions {d}/pred", ["480p/a/00001.png: unreadable"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/nowhere", ["nowhere: no such predictions"]),
    # expression files: not JSON, of another shape
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-not-json", ["train/meta_expressions.json: not JSON"]),
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-no-expressions",
     ["train/meta_expressions.json: KeyError 'expressions'"]),
    ("eval", "--bench ytvos --ckpt {good} --data-root {d}/ytvos-no-expressions",
     ["valid/meta_expressions.json: KeyError", "expected the Ref-YouTube-VOS expression file"]),
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-not-utf8",
     ["train/meta_expressions.json: not JSON ('utf-8' codec can't decode"]),
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-no-obj-id",       # it trained on the background
     ["train/meta_expressions.json: KeyError 'obj_id'"]),
    ("train", "--mode finetune --data davis17 --data-root {d}/ytvos-no-obj-id",       # a KeyError's traceback
     ["train/meta_expressions.json: KeyError 'obj_id'", "expected the converted Ref-DAVIS17 expression file"]),
    # flags out of range, not finite, not numbers
    ("train", "--steps -5", ["argument --steps: got '-5', expected an integer >= 1"]),
    ("train", "--batch-size 0", ["argument --batch-size: got '0'"]),
    ("train", "--steps ten", ["argument --steps: got 'ten'"]),
    ("train", "--lr nan", ["argument --lr: got 'nan', expected a finite number >= 1e-37"]),
    ("train", "--lr inf", ["argument --lr: got 'inf'"]),
    ("train", "--lr 0", ["argument --lr: got '0'"]),
    ("train", "--weight-decay -1", ["argument --weight-decay: got '-1', expected a finite number >= 0"]),
    ("train", "--grad-clip 0", ["argument --grad-clip"]),
    ("train", "--seed -1", ["argument --seed"]),
    ("train", "--workers -1", ["argument --workers"]),
    ("eval", "--bench synthetic --ckpt {good} --workers -1", ["argument --workers"]),
    ("train", "--ckpt-every 0", ["argument --ckpt-every"]),
    ("train", "--mode finetune --train-size 0", ["argument --train-size"]),
    ("eval", "--bench synthetic --ckpt {good} --batch-size 0", ["argument --batch-size"]),
    ("eval", "--bench synthetic --ckpt {good} --num-clips 0", ["argument --num-clips"]),
    ("eval", "--bench kinetics", ["argument --bench: invalid choice: 'kinetics'"]),
    # flags that contradict each other
    ("train", "--resume --overwrite", ["--resume", "--overwrite", "give one of them"]),
    ("train", "--mode finetune --data davis17 --data-root {d} --train-size 64", ["--train-size is the number of "
                                                                                "synthetic training clips: it needs"]),
    ("train", "--mode pretrain --data synthetic ytvos --data-root {d}", ["--data ytvos is an R-VOS dataset: it is for "
                                                                        "--mode finetune (pre-train on smit or"]),
    ("train", "--steps 10 --warmup 50", ["--warmup 50 is longer than the run"]),
    ("train", "--mode pretrain --init {d}/pre.safetensors", ["--init and --encoders are for --mode finetune"]),
    ("train", "--mode finetune --data synthetic smit --data-root {d}", ["--data smit has captions, no masks or boxes"]),
    ("train", "--mode finetune --encoders {d}/pre.safetensors --vit {d}/vit.bin", ["--encoders brings its own encoders"]),
    # a checkpoint without its tokenizer: a new one would give its text encoder other ids
    ("train", "--mode finetune --init {d}/no-spm/pre.safetensors", ["no spm.model beside", "no-spm/pre.safetensors"]),
    ("train", "--mode finetune --encoders {d}/no-spm/pre.safetensors", ["no spm.model beside", "no-spm/pre.safetensors"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred --ckpt {good}",
     ["--predictions scores a folder of masks and --ckpt runs a model: give one of them"]),
    ("eval", "--bench ytvos --predictions {d}/pred --data-root {d}", ["--predictions", "goes with --bench davis17"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred --out {d}/o", ["--out: with --predictions"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/a-file", ["a-file: a file; expected a predictions"]),
    # flags that would do nothing: refused rather than ignored
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred --batch-size 2",
     ["--batch-size is for a model run; --predictions scores masks without one"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred --spm {spm}", ["--spm is for a model run"]),
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred --workers 0", ["--workers is for a model"]),
    ("eval", "--bench ytvos --ckpt {good} --data-root {d} --num-clips 8", ["--num-clips", "goes with --bench synthetic"]),
    ("eval", "--ckpt {good} --video {d}/frames --text the --batch-size 2", ["--batch-size goes with a --bench"]),
    ("eval", "--ckpt {good} --video {d}/frames --text the --workers 2", ["--workers goes with a --bench"]),
    # ... after the checks that name the real mistake: a model run given --predictions too, a --bench left out
    ("eval", "--bench davis17 --davis-root {d}/davis --predictions {d}/pred --ckpt {good} --spm {spm}",
     ["--predictions scores a folder of masks and --ckpt runs a model: give one of them"]),
    ("eval", "--ckpt {good} --data-root {d} --batch-size 2", ["--data-root goes with --bench davis17, ytvos or visor"]),
    ("train", "--skip-bad --steps 1", ["--skip-bad skips the unreadable files of real datasets"]),
    ("train", "--mode finetune --init {d}/pre.safetensors --config small", ["--config small: --init and --encoders take"]),
    ("train", "--mode finetune --encoders {d}/pre.safetensors --config small --steps 1", ["--config small: --init and"]),
    ("data", "--out {d}/sheet-folder.png", ["--out", "sheet-folder.png is a folder; expected an image file name"]),
    ("eval", "--bench synthetic --ckpt {good} --video {d}/frames --text the", ["--video and --text"]),
    ("eval", "--ckpt {good} --video {d}/frames --text ' '", ["--text is empty"]),
    # output paths that cannot be written (a traceback, after the whole evaluation for --bench synthetic)
    ("eval", "--bench synthetic --ckpt {good} --out {d}/a-file", ["--out", "a-file is a file; expected a folder"]),
    ("eval", "--bench synthetic --ckpt {good} --out {d}/a-file/o", ["--out", "a-file is a file; expected a folder"]),
    ("data", "--out {d}/sheet.psd", ["--out", "sheet.psd: expected an image file name"]),       # Pillow reads, not writes
    ("data", "--out {d}/sheet.xyz", ["--out", "sheet.xyz: expected an image file name"]),
    ("data", "--out {d}/a-file/sheet.png", ["--out", "a-file is a file; expected a folder"]),
    ("data", "synthetic --data-root {d}", ["--data-root: the synthetic world is made here and has no root"]),
    # an empty path (a quoted shell variable left unset) is not "not given": --init '' trained from random weights
    # (--steps 1: where the flag passes, the run ends soon)
    ("train", "--mode finetune --init '' --steps 1", ["argument --init: got '', expected a path"]),
    ("train", "--mode finetune --encoders '' --steps 1", ["argument --encoders: got ''"]),
    ("train", "--t5 '' --spm {spm} --steps 1", ["argument --t5: got ''"]),
    ("train", "--vit '' --steps 1", ["argument --vit: got ''"]),
    ("train", "--spm '' --steps 1", ["argument --spm: got ''"]),
    ("train", "--out '' --steps 1", ["argument --out: got ''"]),
    ("train", "--mode finetune --data ytvos --data-root ''", ["argument --data-root: got ''"]),
    ("eval", "--bench synthetic --ckpt {good} --spm '' --num-clips 2 --out {d}/o-spm", ["argument --spm: got ''"]),
    ("eval", "--bench synthetic --ckpt {good} --num-clips 2 --out ''", ["argument --out: got ''"]),
    ("data", "--out ''", ["argument --out: got ''"]),
    ("gpu", "--parts 1 --out ''", ["argument --out: got ''"]),
    # a seed past what torch's generators take (2**64 - 1, and seed * 100003 + epoch for the data order): a traceback.
    # The range is the one of numpy's RandomState and Lightning's seed_everything, [0, 2**32 - 1]
    ("train", "--seed 99999999999999999999", ["argument --seed: got '99999999999999999999'", "<= 4294967295"]),
    ("train", "--seed 200000000000000", ["argument --seed: got '200000000000000'"]),
    ("train", "--lr 1e300 --steps 1", ["argument --lr: got '1e300', expected a finite number >= 1e-37 and <= "
                                      "3.40282e+37"]),
    ("train", "--lr 1e-300 --steps 1", ["argument --lr: got '1e-300'"]),   # 0 in float32: the weights stayed put
    ("train", "--data foo", ["argument --data: invalid choice: 'foo'"]),          # it said "--data foo needs --data-root"
    # files whose bytes make torch's weights-only unpickler raise a KeyError
    ("train", "--resume --out {d}/text-resume", ["text-resume/resume.pt: unreadable", "expected the resume.pt"]),
    ("train", "--vit {d}/text-vit.bin --spm {spm}", ["text-vit.bin: unreadable weights"]),
    # the folders there, nothing in them: a sentencepiece traceback; an empty submission.zip; a table of NaN
    ("train", "--mode finetune --data ytvos --data-root {d}/ytvos-empty", ["--data ytvos", "no training clips"]),
    ("eval", "--bench ytvos --ckpt {good} --data-root {d}/ytvos-empty --out {d}/o-ytvos-empty",
     ["ytvos-empty: no valid video with an expression"]),
    ("eval", "--bench davis17 --davis-root {d}/davis-empty-list --predictions {d}/pred",
     ["davis-empty-list/ImageSets/2017/val.txt: no sequence listed"]),
    # a root that the benchmark does not read, silently ignored
    ("eval", "--ckpt {good} --davis-root {d}/davis --video {d}/v --text t",     # not "davis17, ytvos or visor"
     ["--davis-root goes with --bench davis17 (the demo reads --video)"]),
    ("eval", "--bench synthetic --ckpt {good} --data-root {d}/ytvos-empty --out {d}/o-synthetic",
     ["--data-root: --bench synthetic"]),
    ("eval", "--bench ytvos --ckpt {good} --data-root {d}/ytvos-truncated-frame --davis-root {d}/davis --out {d}/o-y",
     ["--davis-root is the DAVIS 2017 ground truth of --bench davis17"]),
    ("eval", "--bench visor --ckpt {good} --data-root {d}/ytvos-empty --davis-root {d}/davis --out {d}/o-v",
     ["--davis-root is the DAVIS 2017 ground truth of --bench davis17; --bench visor reads its own"]),
    # the GPU check's report, written after its first part (a traceback there)
    ("gpu", "--parts 1 --out {d}", ["is a folder; expected the report's file name"]),
    ("gpu", "--parts 1 --out {d}/a-file/report.md", ["a-file is a file; expected a folder"]),
]


def error_line(main, argv, capsys):
    """(exit status, what the program printed) of a main() that must stop with SystemExit."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, err = e.value.code, capsys.readouterr().err
    return (1, code) if isinstance(code, str) else (code, err)   # sys.exit("...") prints the text and exits 1


@pytest.mark.parametrize("program, args, names", CASES, ids=[f"{p} {a}" for p, a, _ in CASES])
def test_bad_input_gives_one_error_line(program, args, names, d, tmp_path, capsys):
    argv = shlex.split(args.format(d=d, good=d / "good.safetensors", spm=d / "spm.model"))
    if program == "train":
        argv = [*FAST, "--out", str(tmp_path / "out"), *argv]        # a later --out wins
    mains = {"train": train.main, "eval": ev.main, "data": data.main, "gpu": gpu_check.main}
    status, text = error_line(mains[program], argv, capsys)
    assert status != 0
    assert text.startswith("error: ") and len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    for name in names:
        assert name in text, text


def test_a_failed_submission_leaves_no_zip(d, tmp_path, capsys):
    """Ref-YouTube-VOS valid with a truncated frame of its second video: the run stops with its line and leaves no
    submission.zip (it left an empty or partial one, a file that looks like a submission), not even an earlier run's
    in the same --out (which would be uploaded as this run's)."""
    argv = ["--bench", "ytvos", "--ckpt", str(d / "good.safetensors"), "--data-root", str(d / "ytvos-truncated-frame"),
            "--workers", "0", "--out", str(tmp_path / "o")]
    (tmp_path / "o").mkdir()
    (tmp_path / "o/submission.zip").write_bytes(b"an earlier run's submission")
    status, text = error_line(ev.main, argv, capsys)
    assert status != 0 and "vid_b/00003.jpg: unreadable image" in text
    assert (tmp_path / "o").is_dir() and not list((tmp_path / "o").glob("submission.zip*"))


def test_skip_bad_trains_past_an_unreadable_frame(d, tmp_path):
    """With --skip-bad the run that stops at vid_b/00003.jpg (the table above) trains on: every clip of vid_b holds
    that frame, so each is skipped for the next good one and counted in a warning."""
    argv = [*FAST, "--mode", "finetune", "--data", "ytvos", "--data-root", str(d / "ytvos-truncated-frame"),
            "--spm", str(d / "spm.model"), "--steps", "4", "--batch-size", "2", "--out", str(tmp_path / "out")]
    with pytest.warns(UserWarning, match=r"skipped a bad clip \(\d+ so far in this process\): .*vid_b/00003.jpg: unr"):
        train.main([*argv, "--skip-bad"])
    assert (tmp_path / "out/ckpt.safetensors").is_file()
    root = shutil.copytree(d / "ytvos-truncated-frame", tmp_path / "all-bad")
    truncate(root / "train/JPEGImages/vid_a/00003.jpg")                # now every clip holds a bad frame
    argv[argv.index("--data-root") + 1], argv[-1] = str(root), str(tmp_path / "out2")
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as e:
        train.main([*argv, "--skip-bad"])
    assert re.fullmatch(r"error: each of the 2 clips of the dataset is bad as drawn this epoch, the last: "
                        r".*/00003.jpg: unreadable image .*", str(e.value))


def test_a_run_into_a_used_folder_leaves_its_checkpoint_byte_for_byte(tmp_path, spm_model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")       # the torch path of the warp: the interpreter is slow (SPEC §2)
    out = tmp_path / "run"
    first = ["--mode", "pretrain", "--steps", "2", *FAST, "--spm", str(spm_model), "--out", str(out)]
    train.main(first)
    files = ("ckpt.safetensors", "resume.pt", "spm.model", "log.jsonl")
    before = {f: (out / f).read_bytes() for f in files}
    for again in (first, [*first, "--steps", "3", "--fusion", "language", "--seed", "1"],
                  ["--mode", "finetune", "--init", str(out / "ckpt.safetensors"), *FAST, "--out", str(out)]):
        with pytest.raises(SystemExit) as e:
            train.main(again)
        assert str(e.value.code) == (f"error: --out {out} holds the checkpoint of an earlier run; continue it with "
                                     f"--resume, replace it with --overwrite, or choose another --out")
    assert all((out / f).read_bytes() == before[f] for f in files)
    train.main([*first, "--steps", "3", "--resume"])                                 # continue it
    assert json.loads(slvp.read_checkpoint_metadata(out / "ckpt.safetensors")["extra"])["step"] == 3
    train.main([*first, "--overwrite"])                                            # or replace it on purpose
    assert json.loads(slvp.read_checkpoint_metadata(out / "ckpt.safetensors")["extra"])["step"] == 2
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 2]


def test_encoders_take_the_checkpoints_config(d, tmp_path, monkeypatch):
    """--encoders builds the model of the checkpoint's config and fusion, as --init does, also where its vocabulary is
    larger than its tokenizer (T5's 32128 rows for 32000 pieces; here 64 for 37): the encoders are the checkpoint's,
    the decoder is random, drawn as if nothing had been loaded."""
    monkeypatch.delenv("TRITON_INTERPRET")       # the torch path of the warp: the interpreter is slow (SPEC §2)
    src = slvp.load_checkpoint(d / "pre.safetensors")
    argv = ["--mode", "finetune", "--encoders", str(d / "pre.safetensors"), "--freeze-vision"]
    torch.manual_seed(0)
    model = train.build_model(train.parse_args(argv), slvp.Tokenizer(d / "spm.model"))
    torch.manual_seed(0)
    fresh = slvp.SLVP(src.cfg, "vision", "rvos")
    assert model.cfg == src.cfg and src.cfg.vocab_size > len(slvp.Tokenizer(d / "spm.model"))
    assert all(torch.equal(v, fresh.decoder.state_dict()[k]) for k, v in model.decoder.state_dict().items())
    train.main([*argv, "--steps", "1", *FAST, "--out", str(tmp_path / "ft")])   # and it trains
    tuned = slvp.load_checkpoint(tmp_path / "ft/ckpt.safetensors")
    for part in ("text", "vision"):                                              # both frozen here
        assert all(torch.equal(v, getattr(src, part).state_dict()[k]) for k, v in getattr(tuned, part).state_dict().items())
    lang = tmp_path / "lang"                                     # a language-as-query pre-training: its fusion too,
    lang.mkdir()                                                 # unless --fusion says otherwise
    slvp.save_checkpoint(lang / "pre.safetensors", slvp.SLVP(src.cfg, "language"))
    shutil.copy(d / "spm.model", lang)
    for extra, fusion in (([], "language"), (["--fusion", "vision"], "vision")):
        argv = ["--mode", "finetune", "--encoders", str(lang / "pre.safetensors"), *extra]
        assert train.build_model(train.parse_args(argv), slvp.Tokenizer(d / "spm.model")).fusion == fusion


@pytest.mark.parametrize("argv, name", [(["eval.py", "--bench", "synthetic", "--ckpt", "{d}/truncated.safetensors"],
                                          "truncated.safetensors"),
                                         (["train.py", "--batch-size", "0"], "--batch-size")])
def test_the_shell_sees_one_line(argv, name, d):
    """As a user runs them: stderr is the one line, nothing else."""
    r = subprocess.run([sys.executable, *[str(ROOT / a) if a.endswith(".py") else a.format(d=d) for a in argv]],
                       env=ENV, cwd=d, capture_output=True, text=True)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and name in r.stderr, r.stderr


def test_the_shell_sees_what_was_skipped_as_notes(d, tmp_path):
    """A loader's skips reach the shell as `note: ...` lines, from the main process (empty expressions) and from a
    data worker (a bad clip), not as UserWarnings each followed by the line of data.py that raised it."""
    meta = {"videos": {v: {"expressions": {"0": {"exp": "the red square", "obj_id": "1"}, "1": {"exp": " ", "obj_id": "1"}}}
                       for v in ("vid_a", "vid_b")}}
    root = ytvos_tree(tmp_path / "ytvos", json.dumps(meta))
    truncate(root / "train/JPEGImages/vid_b/00003.jpg")
    argv = ["--mode", "finetune", "--data", "ytvos", "--data-root", str(root), "--spm", str(d / "spm.model"),
            "--skip-bad", *FAST, "--workers", "1", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], env=ENV, cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "note: Ref-YouTube-VOS train: skipped 2 empty expressions (vid_a expression 1, vid_b expression 1)"
    assert lines[1] == "note: frozen with random weights: the text encoder (no --t5)"          # train.py's own
    assert re.fullmatch(r"note: skipped a bad clip \(1 so far in this process\): .*/vid_b/00003.jpg: unreadable "
                        r"image .*", lines[2])
    assert all(line.startswith("note: ") for line in lines), r.stderr


def test_every_flag_has_a_help_that_gives_its_default(monkeypatch):
    """The parsers of train.py, eval.py, the dataset inspector and the GPU check, caught as they parse: each flag has a
    help, and one with a default (not None or off) names it (e.g. `--mode` once said what pretrain does, not that it is
    the default)."""
    parsers = []

    def catch(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    for main in (train.main, ev.main, data.main, gpu_check.main):
        with pytest.raises(SystemExit):
            main([])
    assert len(parsers) == 4
    for p in parsers:
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = "/".join(a.option_strings) or a.dest
            assert a.help and a.help.strip(), flag
            if a.default not in (None, False):
                assert "default" in a.help, flag


@pytest.mark.parametrize("script, args", [
    ("data.py", "--out {tmp}/sheet.png"),
    ("train.py", "--steps 1 --batch-size 2 --eval-clips 2 --spm {d}/spm.model --out {tmp}/run"),
    ("eval.py", "--bench synthetic --ckpt {d}/good.safetensors --num-clips 2 --out {tmp}/o")])
@pytest.mark.parametrize("buffered", [True, False])
def test_output_into_a_closed_pipe_ends_quietly(script, args, buffered, d, tmp_path):
    """`python data.py | head -3`: with the reader gone, the next line printed met EPIPE and Python's BrokenPipeError
    traceback; now the script ends with status 1 and says nothing more, as `cat` does. Here the pipe's reading end is
    closed before the script starts, so that its first line meets it: at once unbuffered, at the end buffered (a
    pipe's stdout, unless PYTHONUNBUFFERED is set), where "Exception ignored ... BrokenPipeError" came, status 120."""
    r, w = os.pipe()
    os.close(r)
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"} if buffered else {**ENV, "PYTHONUNBUFFERED": "1"}
    try:
        p = subprocess.run([sys.executable, script, *shlex.split(args.format(d=d, tmp=tmp_path))], stdout=w,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=300)
    finally:
        os.close(w)
    assert p.returncode == 1 and not any(w in p.stderr for w in ("Traceback", "Broken", "error:")), p.stderr


def test_a_refused_resume_keeps_the_runs_tokenizer(tmp_path, spm_model, monkeypatch, capsys):
    """--resume with another --spm: the run's spm.model was replaced before the resume was checked, so the refused
    resume left a checkpoint beside a tokenizer it was not trained with (no resume possible after it, and a fine-tuning
    from it reading other ids without a word). It stops with one line and leaves the run's files byte for byte."""
    monkeypatch.delenv("TRITON_INTERPRET")
    out = tmp_path / "run"
    train.main(["--steps", "2", *FAST, "--spm", str(spm_model), "--out", str(out)])
    other = other_spm_model(tmp_path)
    before = {f: (out / f).read_bytes() for f in ("spm.model", "ckpt.safetensors", "resume.pt")}
    assert before["spm.model"] == spm_model.read_bytes()
    status, text = error_line(train.main, ["--resume", "--steps", "4", *FAST, "--spm", str(other), "--out", str(out)],
                              capsys)
    assert {f: (out / f).read_bytes() for f in before} == before, text
    assert status != 0 and text.startswith("error: --resume: ") and "other.model" in text, text
    assert text.rstrip().endswith("a resumed run keeps its own: leave out --spm"), text
    train.main(["--resume", "--steps", "3", *FAST, "--out", str(out)])        # and the run goes on as it was
    assert (out / "spm.model").read_bytes() == spm_model.read_bytes()


def test_a_refused_resume_names_the_checkpoint_beside_the_other_tokenizer(tmp_path, spm_model, monkeypatch, capsys):
    """A fine-tuning resumed with the --init of another run, whose spm.model is not the run's: the line named --spm,
    which was not given, and said to leave it out; it names the checkpoint and says to give the run's own --init."""
    monkeypatch.delenv("TRITON_INTERPRET")
    train.main(["--steps", "1", *FAST, "--spm", str(spm_model), "--out", str(tmp_path / "pre")])
    train.main(["--steps", "1", *FAST, "--spm", str(other_spm_model(tmp_path)), "--out", str(tmp_path / "pre-other")])
    ft = ["--mode", "finetune", "--train-size", "4", *FAST, "--out", str(tmp_path / "ft")]
    train.main([*ft, "--steps", "1", "--init", str(tmp_path / "pre/ckpt.safetensors")])
    other = tmp_path / "pre-other/ckpt.safetensors"
    status, text = error_line(train.main, [*ft, "--steps", "2", "--resume", "--init", str(other)], capsys)
    assert status != 0 and text.startswith(f"error: --resume: {tmp_path / 'pre-other/spm.model'} is not the tokenizer "
                                           f"of the run in {tmp_path / 'ft'}"), text
    assert text.rstrip().endswith(f"a resumed run keeps its own: it is the one beside {other}, another run's "
                                  f"checkpoint: give the run's own --init"), text
    train.main([*ft, "--steps", "2", "--resume", "--init", str(tmp_path / "pre/ckpt.safetensors")])   # goes on


def test_overwrite_takes_the_new_runs_tokenizer(tmp_path, spm_model, monkeypatch):
    """--overwrite replaces the earlier run on purpose: its spm.model too, with the --spm given (only a resumed run
    keeps its own tokenizer; with --overwrite that check refused another --spm as 'not the tokenizer of the run')."""
    monkeypatch.delenv("TRITON_INTERPRET")
    out = tmp_path / "run"
    train.main(["--steps", "1", *FAST, "--spm", str(spm_model), "--out", str(out)])
    other = other_spm_model(tmp_path)
    train.main(["--steps", "1", *FAST, "--spm", str(other), "--out", str(out), "--overwrite"])
    assert (out / "spm.model").read_bytes() == other.read_bytes()


@pytest.mark.parametrize("flag", ["--init", "--encoders"])
def test_overwrite_never_deletes_the_checkpoint_the_run_starts_from(flag, tmp_path, spm_model, monkeypatch, capsys):
    """--mode finetune --init RUN/ckpt.safetensors --out RUN --overwrite (the line the refusal of a used --out points
    to) deleted the pre-training checkpoint, then failed on it: 'no such checkpoint'."""
    monkeypatch.delenv("TRITON_INTERPRET")
    out = tmp_path / "run"
    train.main(["--steps", "2", *FAST, "--spm", str(spm_model), "--out", str(out)])
    before = (out / "ckpt.safetensors").read_bytes()
    status, text = error_line(train.main, ["--mode", "finetune", flag, str(out / "ckpt.safetensors"), "--steps", "1",
                                           *FAST, "--out", str(out), "--overwrite"], capsys)
    assert status != 0 and f"{flag} " in text and "--overwrite would delete" in text, text
    assert (out / "ckpt.safetensors").read_bytes() == before


def test_overwrite_knows_the_start_checkpoint_by_any_spelling_of_its_path(tmp_path, monkeypatch):
    """--out given relative and --init absolute (or through a link) name the same file: --overwrite must refuse to
    delete it all the same (a comparison of the paths as typed let it through)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    for start in (tmp_path / "run/ckpt.safetensors", Path("link/ckpt.safetensors"), Path("run/../run/resume.pt")):
        args = train.parse_args(["--mode", "finetune", "--init", str(start), "--out", "run", "--overwrite"])
        with pytest.raises(SystemExit, match="is the checkpoint that --overwrite would delete"):
            train.check_out(args)


@pytest.fixture
def locked(monkeypatch):
    """lock(folder): `folder` unwritable for this process: chmod 555, or as root (who writes anyway) the immutable
    attribute (chattr +i); where neither holds (root without the capability), os.access answers no for it, as
    access(2) does on a read-only mount. Undone at the end."""
    done, denied = [], []
    access = os.access

    def lock(folder):
        os.chmod(folder, 0o555)
        done.append(lambda: os.chmod(folder, 0o755))
        if os.access(folder, os.W_OK):
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
                done.append(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
            else:
                denied.append(Path(folder).resolve())
                monkeypatch.setattr(os, "access", lambda p, mode, **k: (Path(p).resolve() not in denied
                                                                         and access(p, mode, **k)))
        return folder
    yield lock
    for undo in reversed(done):
        undo()


def test_a_read_only_output_folder_gives_one_line(d, tmp_path, locked, capsys):
    """An --out that cannot be written (a read-only mount, permissions): train.py, eval.py and the inspector stopped with
    a PermissionError (or EROFS) traceback, eval.py --predictions only after scoring every sequence."""
    pred = shutil.copytree(d / "pred", tmp_path / "ro" / "pred")
    locked(pred)
    ro = locked(tmp_path / "ro")
    cases = [(train.main, [*FAST, "--steps", "1", "--out", str(ro / "new")], "--out"),
             (ev.main, ["--bench", "synthetic", "--ckpt", str(d / "good.safetensors"), "--num-clips", "2",
                        "--out", str(ro / "eval")], "--out"),
             (data.main, ["--out", str(ro / "sheet.png")], "--out"),
             (ev.main, ["--bench", "davis17", "--davis-root", str(d / "davis"), "--predictions", str(pred)], "pred"),
             (gpu_check.main, ["--parts", "1", "--out", str(ro / "gpu_check.md")], "--out")]
    for main, argv, name in cases:
        status, text = error_line(main, argv, capsys)
        assert status != 0 and text.startswith("error: ") and len(text.strip().splitlines()) == 1, text
        assert name in text and "not writable" in text, text
    assert sorted(p.name for p in ro.iterdir()) == ["pred"]


def test_the_largest_value_a_flag_allows_is_allowed():
    """data.number's upper bound is inclusive, as its message says ("<= 4294967295"): --seed takes numpy's whole seed
    range [0, 2**32 - 1] (np.random.RandomState takes 2**32 - 1 and refuses 2**32), and --lr its bound itself."""
    np.random.RandomState(2**32 - 1)
    with pytest.raises(ValueError):
        np.random.RandomState(2**32)
    assert train.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1
    with pytest.raises(SystemExit):
        train.parse_args(["--seed", str(2**32)])
    top = float(np.finfo(np.float32).max) / 10
    assert train.parse_args(["--lr", repr(top)]).lr == top
    assert train.parse_args(["--lr", "1e-37"]).lr == 1e-37 and np.float32(1e-37) >= np.finfo(np.float32).tiny
    with pytest.raises(SystemExit):                          # its lower bound, a normal float32 number
        train.parse_args(["--lr", "9e-38"])
    assert data.number(int, 1, high=3)("3") == 3


def test_finetune_refuses_any_captions_only_dataset(monkeypatch, tmp_path, capsys):
    """The fine-tuning guard read the name 'smit'; a dataset registered in data.DATASETS with rvos = False (captions
    only, as SMiT) passed it and the run then stopped with a KeyError traceback in stage_loss. The class attribute
    that says a dataset has masks is the guard."""
    class Captions(data.SMiT):
        pass
    monkeypatch.setitem(data.DATASETS, "captions", Captions)
    status, text = error_line(train.main, [*FAST, "--out", str(tmp_path / "out"), "--mode", "finetune", "--data",
                                           "captions", "--data-root", str(tmp_path)], capsys)
    assert status != 0 and text.startswith("error: ") and "--data captions has captions, no masks or boxes" in text
