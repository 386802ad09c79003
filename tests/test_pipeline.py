"""Issue 7's fast check: a one-minute version of the whole pipeline (pre-train, fine-tune from it, evaluate with
eval.py --bench synthetic) must beat the trivial predictors (empty masks; the whole frame) on held-out clips."""
import numpy as np

import data
import eval as ev
from test_train import FAST, run


def trivial_scores(cfg, n):
    ds = data.build_dataset("synthetic", None, "val", cfg, train=False, size=n)
    scores = {}
    for name, fill in (("empty", np.zeros_like), ("whole frame", np.ones_like)):
        jf = []
        for i in range(len(ds)):
            gt = ds[i]["masks"].numpy()
            j, f = ev.evaluate_objects(gt[None], fill(gt)[None], match=False)
            jf.append((j.mean() + f.mean()) / 2)
        scores[name] = float(np.mean(jf))
    return scores


def test_one_minute_pipeline_beats_trivial_predictors(tmp_path):
    pre = run(["--mode", "pretrain", "--steps", "20", *FAST, "--out", str(tmp_path / "pre")])
    assert pre.returncode == 0, pre.stderr
    ft = run(["--mode", "finetune", "--init", str(tmp_path / "pre" / "ckpt.safetensors"), "--steps", "400",
              "--lr", "1e-3", *FAST, "--batch-size", "8", "--out", str(tmp_path / "ft")])
    assert ft.returncode == 0, ft.stderr
    model, tokenizer = ev.load_model_and_tokenizer(tmp_path / "ft" / "ckpt.safetensors", None, "cpu")
    s = ev.synthetic_scores(model, tokenizer, n=32)
    trivial = trivial_scores(model.cfg, 32)
    print("J&F", s["J&F"], "trivial", trivial)
    assert s["J&F"] > max(trivial.values()) + 0.02
