"""eval.py: J and F on hand-worked cases (void, the empty-boundary conventions, the boundary map at the frame's edge),
the dilation and the Hungarian method against brute force, matching on the mean of J and F, the statistics, the
--predictions path on generated DAVIS trees (every column of the tables), inference through models whose logits are
known (the resize to the original size, padded frames, the submission's threshold, one id per Ref-DAVIS17 object), the
mean of the four runs, the submission zip, the synthetic bench and the demo. Each of 36 plausible bugs in eval.py
(mutations, one at a time) fails at least one of them."""
import csv
import dataclasses
import itertools
import json
import shutil
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import slvp
from test_data import write_video_file


def square(shape=(100, 100), y=20, x=20, size=20):
    m = np.zeros(shape, bool)
    m[y:y + size, x:x + size] = True
    return m


# ---------------------------------------------------------------------------------------------- J and F

def test_j_and_f_hand_worked():
    empty = np.zeros((100, 100), bool)
    one = empty.copy()
    one[50, 50] = True
    gt, shifted = square(), square(x=25)
    J = lambda g, p, void=None: float(ev.db_eval_iou(g[None], p[None], None if void is None else void[None])[0])
    F = lambda g, p: float(ev.db_eval_boundary(g[None], p[None])[0])
    assert J(empty, empty) == 1 and F(empty, empty) == 1              # both empty
    assert J(gt, empty) == 0 and F(gt, empty) == 0                    # nothing predicted: P = 1, R = 0
    assert J(empty, gt) == 0 and F(empty, gt) == 0                    # nothing to find: P = 0, R = 1
    assert J(one, one) == 1 and F(one, one) == 1                      # a one-pixel object
    # a 20x20 square shifted 5 px right: J = 300 / 500. F: radius ceil(0.008 * 141.4) = 2; each boundary is the
    # 80-pixel ring of a 21x21 square, of which 18 + 18 top/bottom pixels and 4 near-corner pixels lie within 2 px
    # of the other ring: P = R = 40 / 80, F = 0.5
    assert J(gt, shifted) == pytest.approx(0.6)
    assert F(gt, shifted) == pytest.approx(0.5)
    # void pixels (the 5 columns only the prediction covers) are left out: J = 300 / 400
    void = np.zeros((100, 100), bool)
    void[:, 40:45] = True
    assert J(gt, shifted, void) == pytest.approx(0.75)
    # and removed before the boundary is taken: the prediction is then the block of columns 25-39, its ring of 70
    # pixels (x = 24 and 39, y = 19 and 39); within 2 px of the other ring: P = (20 + 16 + 14 + 2 + 3) / 70 (the right
    # side, the top, the bottom, two and three pixels of the left side near the top and the bottom) and
    # R = (20 + 18 + 17) / 80, so F = 2 * 55 / (70 + 80)
    Fv = float(ev.db_eval_boundary(gt[None], shifted[None], void[None])[0])
    assert Fv == pytest.approx(110 / 150)
    # boundaries more than 2 px apart: P = R = 0, and F = 0 (the evaluator's convention when P + R = 0)
    assert F(gt, square(x=60)) == 0


def test_boundary_map_at_the_frame_edge():
    """DAVIS's seg2bmap, worked by hand: a pixel is boundary where it differs from its east, south or south-east
    neighbour, but in the last row and column it is compared along the edge only (and the corner never is), so a
    mask reaching the frame's right edge has no boundary there. A mask and its complement have the same map."""
    seg = np.zeros((3, 3), bool)
    seg[:, 1:] = True
    assert ev.seg2bmap(seg).astype(int).tolist() == [[1, 0, 0]] * 3
    for m in (seg, square(), square(y=90, x=85)):
        assert np.array_equal(ev.seg2bmap(~m), ev.seg2bmap(m))


def test_disk_dilation_matches_brute_force():
    rng = np.random.default_rng(0)
    for shape in [(40, 50), (7, 90), (1, 20), (3, 3)]:
        m = rng.random(shape) > 0.93
        for r in (1, 2, 5, 8):
            expected = np.zeros_like(m)
            for y, x in zip(*np.nonzero(m)):
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        if dx * dx + dy * dy <= r * r and 0 <= y + dy < shape[0] and 0 <= x + dx < shape[1]:
                            expected[y + dy, x + dx] = True
            assert np.array_equal(ev.disk_dilate(m, r), expected), (shape, r)


def test_evaluate_objects_limits():
    gt, pred = np.zeros((2, 3, 4, 4), bool), np.zeros((21, 3, 4, 4), bool)
    with pytest.raises(ValueError, match="21 predicted ids: more than the 20 proposals the protocol allows"):
        ev.evaluate_objects(gt, pred)
    assert ev.evaluate_objects(gt, pred[:20])[0].shape == (2, 3)                  # 20 are allowed
    with pytest.raises(ValueError, match="predictions use id 3, above the 2 objects of the sequence"):
        ev.evaluate_objects(gt, pred[:3], match=False)


def test_evaluate_objects_holds_one_proposals_boundaries_at_a_time():
    """The unsupervised protocol's 20 proposals: their boundary maps (two masks' size each) held at once are 1.7 GB
    of a 104-frame 480p sequence (46 masks' bytes at the peak here); one proposal's at a time, the peak is a few
    masks' bytes (numpy's arrays are traced by tracemalloc)."""
    import tracemalloc
    T, H, W = 8, 120, 200
    gt = np.zeros((2, T, H, W), bool)
    gt[0, :, 10:60, 20:90], gt[1, :, 70:110, 100:180] = True, True
    pred = np.zeros((20, T, H, W), bool)
    for k in range(20):
        pred[k, :, 5 * k:5 * k + 40, 8 * k:8 * k + 50] = True
    tracemalloc.start()
    ev.evaluate_objects(gt, pred)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * T * H * W, f"peak {peak / (T * H * W):.1f} masks' bytes"


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(150):
        n, k = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        S = rng.random((n, k)).round(1)                              # ties included
        rows, cols = ev.linear_sum_assignment(S)
        if n <= k:
            best = max(sum(S[i, p[i]] for i in range(n)) for p in itertools.permutations(range(k), n))
        else:
            best = max(sum(S[p[j], j] for j in range(k)) for p in itertools.permutations(range(n), k))
        assert len(rows) == min(n, k) and len(set(cols)) == len(cols) and list(rows) == sorted(rows)
        assert S[rows, cols].sum() == pytest.approx(best)


def test_hungarian_pairs_as_scipy_also_on_ties():
    """The official evaluator matches with scipy's linear_sum_assignment: where scores tie, J and F taken apart (and
    recall, decay, the per-sequence rows) depend on which optimum it picks. Up to commit 18e2ed9, 424 of these 4000
    matrices (ties mostly) paired otherwise, the total score the same."""
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    for k in range(4000):
        n, m = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        S = [rng.integers(0, 3, (n, m)) / 2, rng.random((n, m)).round(1),             # ties, many and some
             np.repeat(rng.random((1, m)).round(2), n, 0), rng.random((n, m))][k % 4]  # equal rows; no ties
        rows, cols = ev.linear_sum_assignment(S)
        ref_rows, ref_cols = linear_sum_assignment(-S)
        assert np.array_equal(rows, ref_rows) and np.array_equal(cols, ref_cols), S


def test_statistics_hand_worked():
    m, recall, decay = ev.db_statistics([0.9] * 4 + [0.1] * 4)
    # quarters of 8 frames by the evaluator's rounding: [0:3] and [5:8]
    assert m == pytest.approx(0.5) and recall == pytest.approx(0.5) and decay == pytest.approx(0.8)
    # 10 frames: bin edges round(linspace(1, 10, 5)) - 1 = 0, 2, 5, 7, 9, each bin up to its right edge included,
    # so the first quarter is frames 0-2 and the last 7-9; recall counts values above 0.5, not 0.5 itself
    m, recall, decay = ev.db_statistics([0.1, 0.9, 0.3, 0.5, 0.6, 0.2, 1.0, 0.4, 0.8, 0.0])
    assert m == pytest.approx(0.48) and recall == pytest.approx(0.4)
    assert decay == pytest.approx((0.1 + 0.9 + 0.3) / 3 - (0.4 + 0.8 + 0.0) / 3)
    # 7 frames: linspace(1, 7, 5) = 1, 2.5, 4, 5.5, 7; the evaluator adds 1e-10 before rounding, so 2.5 and 5.5 go up
    # (numpy alone rounds them to even: 2 and 6): edges 0, 2, 3, 5, 6, quarters [0:3] and [5:7]
    assert ev.db_statistics([1, 1, 0, 0, 0, 0, 0])[2] == pytest.approx(2 / 3)


def test_matching_takes_the_mean_of_j_and_f():
    """The unsupervised protocol assigns predicted ids by the mean of J and F: of two proposals for one object, the
    square shifted 3 px (J = 340 / 460 = 0.739, F = 0.55) and the 16x16 square centred in it (J = 256 / 400 = 0.64,
    its ring 2 px inside the object's, F = 0.92), the second wins, though its J alone is lower."""
    gt, shifted, inner = square(), square(x=23), square(y=22, x=22, size=16)
    j, f = ev.evaluate_objects(gt[None, None], np.stack([shifted, inner])[:, None])
    assert j.tolist() == [[pytest.approx(0.64)]] and f[0, 0] > 0.9


# ---------------------------------------------------------------------------------------------- DAVIS folders

def write_ids(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255] * (253 * 3))
    im.save(path)


def two_sequences(root):
    """A DAVIS tree of sequences a and b (one square object, 2 frames) and predictions equal to it: J = F = 1."""
    for seq in ("a", "b"):
        for t in range(2):
            write_ids(root / f"davis/Annotations_unsupervised/480p/{seq}/{t:05d}.png", square().astype(np.uint8))
            write_ids(root / f"pred/{seq}/{t:05d}.png", square().astype(np.uint8))
    (root / "davis/ImageSets/2017").mkdir(parents=True)
    (root / "davis/ImageSets/2017/val.txt").write_text("a\nb\n")
    return ["--bench", "davis17", "--davis-root", str(root / "davis"), "--predictions", str(root / "pred")]


def test_an_error_after_a_progress_line_starts_a_line_of_its_own(tmp_path, capsys, monkeypatch):
    """Sequence a scored, b's prediction unreadable: the progress line "1/2 sequences, ETA 0s" is ended before the
    error, which the shell printed after it on the same line; an error after the line ended adds no blank line."""
    argv = two_sequences(tmp_path)
    good = (tmp_path / "pred/b/00001.png").read_bytes()
    (tmp_path / "pred/b/00001.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"pred/b/00001.png: unreadable"):
        ev.main(argv)
    err = capsys.readouterr().err
    assert "1/2 sequences" in err and err.endswith("\n"), repr(err)
    (tmp_path / "pred/b/00001.png").write_bytes(good)
    monkeypatch.setattr(ev, "write_tables", lambda *a: (_ for _ in ()).throw(ValueError("tables: no room")))
    with pytest.raises(SystemExit, match="tables: no room"):
        ev.main(argv)
    err = capsys.readouterr().err
    assert "2/2 sequences" in err and err.endswith("\n") and not err.endswith("\n\n"), repr(err)


def test_predictions_write_nothing_to_the_default_out(tmp_path, monkeypatch):
    """--predictions writes its tables into the predictions folder: a file named out where the command runs (the
    default --out's parent) does not stop it."""
    argv = two_sequences(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("not a folder")
    g = ev.main(argv)
    assert (g["J-Mean"], g["F-Mean"]) == (1.0, 1.0)


def test_predictions_path_on_a_generated_davis_tree(tmp_path):
    """Sequence a: objects 1 and 2; the prediction uses swapped ids, object 1 exact and object 2 shifted 5 px
    (J 0.6, F 0.5), and a void band the evaluator must ignore (counted, the band would lower object 2's J to
    300 / 660). Sequence b: one object, nothing predicted."""
    davis, pred = tmp_path / "DAVIS", tmp_path / "pred"
    for t in range(4):
        gt = np.zeros((100, 100), np.uint8)
        gt[square(y=20, x=20)] = 1
        gt[square(y=60, x=60)] = 2
        gt[90:, :] = 255                                             # void, away from both objects
        write_ids(davis / f"Annotations_unsupervised/480p/a/{t:05d}.png", gt)
        p = np.zeros((100, 100), np.uint8)
        p[square(y=20, x=20)] = 2
        p[square(y=60, x=65)] = 1
        p[92:, :50] = 3                                              # a false object inside the void only
        p[92:, 65:85] = 1                                            # object 1 reaching into the void: not counted
        write_ids(pred / f"a/{t:05d}.png", p)
        write_ids(davis / f"Annotations_unsupervised/480p/b/{t:05d}.png", square().astype(np.uint8))
        write_ids(pred / f"b/{t:05d}.png", np.zeros((100, 100), np.uint8))
    (davis / "ImageSets/2017").mkdir(parents=True)
    (davis / "ImageSets/2017/val.txt").write_text("a\nb\n")
    g = ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    J, F = (0.6 + 1 + 0) / 3, (0.5 + 1 + 0) / 3
    assert g["J-Mean"] == pytest.approx(J) and g["F-Mean"] == pytest.approx(F)
    assert g["J&F-Mean"] == pytest.approx((J + F) / 2)
    assert g["J-Recall"] == pytest.approx(2 / 3) and g["J-Decay"] == pytest.approx(0)
    assert g["F-Recall"] == pytest.approx(1 / 3) and g["F-Decay"] == pytest.approx(0)     # F = 0.5 is not above 0.5
    rows = list(csv.reader(open(pred / "global_results-val.csv")))
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert rows[1][:3] == [f"{(J + F) / 2:.3f}", f"{J:.3f}", "0.667"]
    # per object, in the evaluator's order: matched pairs sorted by predicted id (1 -> object 2, 2 -> object 1)
    per = list(csv.reader(open(pred / "per-sequence_results-val.csv")))
    assert per == [["Sequence", "J-Mean", "F-Mean"], ["a_1", "0.600", "0.500"], ["a_2", "1.000", "1.000"],
                   ["b_1", "0.000", "0.000"]]


def test_recall_and_decay_of_j_and_f_each_from_their_own_values(tmp_path):
    """One object, exact in frames 0-1 and shifted 5 px in frames 2-3: J per frame 1, 1, 0.6, 0.6 and F 1, 1, 0.5,
    0.5; with 4 frames the first quarter is frames 0-1 and the last frames 2-3."""
    davis, pred = tmp_path / "DAVIS", tmp_path / "pred"
    for t in range(4):
        write_ids(davis / f"Annotations_unsupervised/480p/a/{t:05d}.png", square().astype(np.uint8))
        write_ids(pred / f"a/{t:05d}.png", square(x=20 if t < 2 else 25).astype(np.uint8))
    (davis / "ImageSets/2017").mkdir(parents=True)
    (davis / "ImageSets/2017/val.txt").write_text("a\n")
    g = ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    assert g == pytest.approx({"J&F-Mean": 0.775, "J-Mean": 0.8, "J-Recall": 1.0, "J-Decay": 0.4,
                               "F-Mean": 0.75, "F-Recall": 0.5, "F-Decay": 0.5})


def test_hidden_files_among_the_annotations_are_left_out(tmp_path):
    """macOS's ._ copy of each PNG (copied to a non-Mac disk) is no annotation: the official evaluator lists with
    glob.glob, which leaves hidden files out. Predictions equal to the truth score exactly 1 (not an error on an
    unreadable file), and a sequence that holds ._ copies alone has no ground truth."""
    davis, pred = tmp_path / "DAVIS", tmp_path / "pred"
    for t in range(2):
        write_ids(davis / f"Annotations_unsupervised/480p/a/{t:05d}.png", square().astype(np.uint8))
        (davis / f"Annotations_unsupervised/480p/a/._{t:05d}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        write_ids(pred / f"a/{t:05d}.png", square().astype(np.uint8))
    (davis / "Annotations_unsupervised/480p/b").mkdir()
    (davis / "Annotations_unsupervised/480p/b/._00000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (davis / "ImageSets/2017").mkdir(parents=True)
    (davis / "ImageSets/2017/val.txt").write_text("a\n")
    g = ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    assert g["J-Mean"] == 1 and g["F-Mean"] == 1
    assert ev.gt_frames(davis / "Annotations_unsupervised/480p", "a") == ["00000", "00001"]
    (davis / "ImageSets/2017/val.txt").write_text("a\nb\n")          # b holds a ._ copy alone: no ground truth
    with pytest.raises(SystemExit, match=r"480p/b: no ground-truth PNGs"):
        ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])


def test_objects_are_the_ids_of_the_first_frame(tmp_path):
    """As the official evaluator (davis2017/davis.py: num_objects = the largest id of the first frame): in sequence a
    object 2 appears from frame 2 on and is not scored, so the exact object 1 alone gives J = F = 1 (counting object 2,
    left unpredicted, would give 0.75 and 0.75); sequence b has no object in its first frame and adds no row."""
    davis, pred = tmp_path / "DAVIS", tmp_path / "pred"
    for t in range(4):
        gt = square().astype(np.uint8)
        if t >= 2:
            gt[square(y=60, x=60)] = 2
        write_ids(davis / f"Annotations_unsupervised/480p/a/{t:05d}.png", gt)
        write_ids(pred / f"a/{t:05d}.png", square().astype(np.uint8))
        write_ids(davis / f"Annotations_unsupervised/480p/b/{t:05d}.png", (square() * (t > 0)).astype(np.uint8))
        write_ids(pred / f"b/{t:05d}.png", np.zeros((100, 100), np.uint8))
    (davis / "ImageSets/2017").mkdir(parents=True)
    (davis / "ImageSets/2017/val.txt").write_text("a\nb\n")
    g = ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    assert g["J-Mean"] == 1 and g["F-Mean"] == 1
    per = list(csv.reader(open(pred / "per-sequence_results-val.csv")))
    assert per == [["Sequence", "J-Mean", "F-Mean"], ["a_1", "1.000", "1.000"]]
    # void (255) in the first frame is not an object: the evaluator sets it to 0 before taking the largest id
    first = square().astype(np.uint8)
    first[90:, :] = 255
    write_ids(davis / "Annotations_unsupervised/480p/a/00000.png", first)
    assert ev.first_frame_objects(davis / "Annotations_unsupervised/480p", "a") == 1


def test_predictions_errors_name_the_file(tmp_path, monkeypatch):
    davis, pred = tmp_path / "DAVIS", tmp_path / "pred"
    write_ids(davis / "Annotations_unsupervised/480p/a/00000.png", square().astype(np.uint8))
    (davis / "ImageSets/2017").mkdir(parents=True)
    (davis / "ImageSets/2017/val.txt").write_text("a\n")
    write_ids(pred / "a/00000.png", np.zeros((50, 100), np.uint8))
    with pytest.raises(SystemExit, match=r"a/00000.png: size \(100, 50\) differs"):
        ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    (pred / "a/00000.png").unlink()
    with pytest.raises(SystemExit, match=r"a/00000.png: missing prediction"):
        ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    with pytest.raises(SystemExit, match=r"ImageSets/2017/val.txt not found"):
        ev.main(["--bench", "davis17", "--davis-root", str(tmp_path / "nowhere"), "--predictions", str(pred)])
    write_ids(pred / "a/00000.png", np.arange(100 * 100).reshape(100, 100) % 22)   # ids 1..21
    with pytest.raises(SystemExit, match=r"pred/a: predictions use id 21: more than the 20 proposals"):
        ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])
    # binary 0/255 masks (Ref-YouTube-VOS's format) refused before a mask is made for each of 255 ids
    write_ids(pred / "a/00000.png", square().astype(np.uint8) * 255)
    split_ids = ev.split_ids
    monkeypatch.setattr(ev, "split_ids", lambda frames, n=None: split_ids(frames, n) if int(frames.max()) <= 20 else 1 / 0)
    with pytest.raises(SystemExit, match=r"pred/a: predictions use id 255: more than the 20 proposals"):
        ev.main(["--bench", "davis17", "--davis-root", str(davis), "--predictions", str(pred)])


def test_overlapping_objects_go_to_the_more_probable():
    """Overlapping masks in one indexed PNG: each pixel to the object of the highest probability above 0.5, as
    ReferFormer's Ref-DAVIS17 inference composes them (probabilities below 0.5 zeroed, a background of 0.1, argmax):
    hand-worked, then against that rule written in torch on random logits."""
    l1 = np.array([[2., 2, 2, 2, -1, -1]], np.float32)
    l3 = np.array([[-1., 1, 3, 2, 1, -1]], np.float32)
    assert ev.merge_objects({3: l3, 1: l1}).tolist() == [[1, 1, 3, 1, 3, 0]]   # a tie to the lower id
    # probabilities, not logits: sigmoid(20) and sigmoid(25) are both 1.0 in float32, a tie; a logit of 0 is 0.5, kept
    saturated = {1: np.array([[20., 9, 0]], np.float32), 2: np.array([[25., 10, -1]], np.float32)}
    assert ev.merge_objects(saturated).tolist() == [[1, 2, 1]]
    rng = np.random.default_rng(0)
    ids = (1, 2, 5)
    logits = {i: rng.normal(0, 2, (20, 30)).astype(np.float32) for i in ids}
    p = torch.sigmoid(torch.from_numpy(np.stack([logits[i] for i in ids])))
    p[p < 0.5] = 0
    ref = torch.argmax(torch.cat([torch.full((1, 20, 30), 0.1), p]), 0).numpy()   # 0: background, k: the k-th id
    got = ev.merge_objects(logits)
    assert (got == np.array((0,) + ids)[ref]).all() and len(np.unique(got)) == 4


# ---------------------------------------------------------------------------------------------- with a model

def spy_workers(monkeypatch):
    """Records the `workers` each benchmark passes to predict (which then reads in the process itself)."""
    seen, predict = [], ev.predict

    def spy(*args, workers=0, **kwargs):
        seen.append(workers)
        return predict(*args, **kwargs)
    monkeypatch.setattr(ev, "predict", spy)
    return seen


@pytest.fixture
def tiny_ckpt(tmp_path, spm_model):
    torch.manual_seed(0)
    cfg = dataclasses.replace(slvp.SLVPConfig.tiny(), frame_size=(48, 64), vocab_size=64)
    path = tmp_path / "model" / "ckpt.safetensors"
    path.parent.mkdir()
    slvp.save_checkpoint(path, slvp.SLVP(cfg, task="rvos"))
    shutil.copy(spm_model, path.parent / "spm.model")
    return path


def test_predict_yields_each_expression_when_its_clips_are_done(tiny_ckpt):
    """predict streams: an expression comes out once its clips are read, before the rest of the dataset is (so a
    benchmark's full-size masks are never all in memory), each expression once, in the dataset's order."""
    model, tok = ev.load_model_and_tokenizer(tiny_ckpt, None, "cpu")
    ds = data.build_dataset("synthetic", None, "val", model.cfg, train=False, size=6)
    read = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            read.append(i)
            return ds[i]

    got = []
    for key, frames in ev.predict(model, Counting(), tok, batch_size=2, progress=False):
        got.append((key, len(read)))
        assert all(m.dtype == np.float32 and m.shape == tuple(model.cfg.frame_size) for m in frames.values())
    keys = [(ds[i]["id"][0], ds[i]["id"][1]) for i in range(len(ds))]
    assert [k for k, _ in got] == keys
    assert got[0][1] <= 4 < len(ds)                           # the first came out after the second batch at most


@pytest.mark.parametrize("bench", ["davis17", "visor", "ytvos"])
def test_masks_are_written_as_each_sequence_is_done(bench, tmp_path, monkeypatch):
    """README, "Evaluation": masks are written as each expression (Ref-YouTube-VOS) or sequence (Ref-DAVIS17, VISOR)
    is done, so memory holds one sequence's masks, not the benchmark's. predict is stood in by a generator over two
    videos of two expressions each; each time it is asked for its next expression, the files on disk are checked:
    every video before the current one (Ref-DAVIS17, VISOR; grouping by video reads one expression ahead), every
    expression yielded so far (Ref-YouTube-VOS) has its PNGs."""
    keys = [("vid_a", "1"), ("vid_a", "2"), ("vid_b", "1"), ("vid_b", "2")]
    names = ["00000", "00001"]
    out = tmp_path / "o"

    def written(vid, exp, run):
        if bench == "ytvos":
            return all((out / "Annotations" / vid / exp / f"{n}.png").is_file() for n in names)
        folder = out / (f"run{run}" if bench == "davis17" else "visor") / vid
        return all((folder / f"{n}.png").is_file() for n in names)

    runs, missing = [], []

    def streaming(model, ds, tokenizer, batch_size=4, device="cpu", progress=True, workers=0):
        run = len(runs)
        runs.append(run)
        for k, (vid, exp) in enumerate(keys):
            yield (vid, exp), {n: np.full((4, 6), 5.0, np.float32) for n in names}
            due = keys[:k + 1] if bench == "ytvos" else [key for key in keys[:k + 1] if key[0] != vid]
            missing.extend((run, key) for key in due if not written(*key, run))

    monkeypatch.setattr(ev, "predict", streaming)
    monkeypatch.setattr(data, "build_dataset", lambda *a, **k: [None] * len(keys))
    monkeypatch.setattr(ev, "davis_sequences", lambda root: (tmp_path, ["vid_a", "vid_b"]))
    monkeypatch.setattr(ev, "first_frame_objects", lambda gt_dir, seq: 2)
    monkeypatch.setattr(ev, "evaluate_davis", lambda *a, **k: ({"J&F-Mean": 0.0}, []))
    monkeypatch.setattr(ev, "write_tables", lambda *a, **k: None)
    monkeypatch.setattr(ev, "print_table", lambda *a, **k: None)
    args = types.SimpleNamespace(data_root=tmp_path, davis_root=tmp_path, out=out, batch_size=2, workers=0)
    getattr(ev, f"bench_{bench}")(args, types.SimpleNamespace(cfg=slvp.SLVPConfig.tiny()), None, "cpu")
    assert runs and not missing, missing


class InWorker(torch.utils.data.Dataset):
    """A dataset's items, read in a worker process (it fails in the process itself). At module level, so that workers
    started by spawning (macOS's and Windows' default) can unpickle it."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        assert torch.utils.data.get_worker_info() is not None
        return self.ds[i]


def test_predict_with_workers_gives_the_same_masks(tiny_ckpt):
    """Clips read by worker processes (eval.py --workers, the default with a GPU) come in the dataset's order: the
    same expressions and the same logits as read in the process itself."""
    model, tok = ev.load_model_and_tokenizer(tiny_ckpt, None, "cpu")
    ds = data.build_dataset("synthetic", None, "val", model.cfg, train=False, size=6)
    alone = list(ev.predict(model, ds, tok, batch_size=2, progress=False))
    workers = list(ev.predict(model, InWorker(ds), tok, batch_size=2, progress=False, workers=2))
    assert [k for k, _ in workers] == [k for k, _ in alone] == [(ds[i]["id"][0], ds[i]["id"][1]) for i in range(6)]
    for (_, a), (_, b) in zip(alone, workers):
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def write_ytvos_valid(root):
    """Ref-YouTube-VOS valid: two videos of 5 frames, two expressions each; test_1 is a test video."""
    from test_data import write_video
    for vid in ("val_1", "test_1"):
        write_video(root / "valid/JPEGImages", None, vid, 5)
    meta = {"videos": {v: {"expressions": {"0": {"exp": "the red circle"}, "1": {"exp": "a square"}},
                           "frames": [f"{t:05d}" for t in range(5)]} for v in ("val_1", "test_1")}}
    for split, content in (("valid", meta), ("test", {"videos": {"test_1": meta["videos"]["test_1"]}})):
        (root / f"meta_expressions/{split}").mkdir(parents=True)
        (root / f"meta_expressions/{split}/meta_expressions.json").write_text(json.dumps(content))
    return root


def test_ytvos_submission_zip(tmp_path, tiny_ckpt, monkeypatch):
    root = write_ytvos_valid(tmp_path / "ytvos")
    workers = spy_workers(monkeypatch)
    zpath = ev.main(["--bench", "ytvos", "--ckpt", str(tiny_ckpt), "--data-root", str(root), "--out", str(tmp_path / "o"),
                     "--workers", "3"])
    assert workers == [3]
    names = sorted(zipfile.ZipFile(zpath).namelist())
    assert names == sorted(f"Annotations/val_1/{e}/{t:05d}.png" for e in ("0", "1") for t in range(5))
    with zipfile.ZipFile(zpath) as z, z.open("Annotations/val_1/1/00004.png") as fh:
        a = np.asarray(Image.open(fh))
    assert a.shape == (48, 64) and set(np.unique(a)) <= {0, 255}


class KnownLogits(torch.nn.Module):
    """A stand-in for the model whose mask logits are known: logits(frames) -> Float[B, T, H, W]."""

    def __init__(self, cfg, logits):
        super().__init__()
        self.cfg, self.logits = cfg, logits

    def forward(self, frames, ids, mask):
        return {"masks": self.logits(frames)}


def test_predict_resizes_the_logits_and_keeps_the_real_frames(spm_model):
    """5 frames of 1x4 pixels, seen at 1x2 in clips of T = 4 (data.eval_clips: the second clip is frame 4 repeated).
    The logits [-1, 1] resized bilinearly with align_corners=False to 4 columns sample the 2 at (i + 0.5) / 2 - 0.5 =
    -0.25, 0.25, 0.75, 1.25, clamped to the edges: -1, -0.5, 0.5, 1 (nearest would give -1, -1, 1, 1; align_corners
    -1, -1/3, 1/3, 1). Each frame's logits also carry 10 x its position in its clip: frame 4 is position 0 of the
    second clip, whose positions 1-3 are padding and must not replace it."""
    items = [{"frames": torch.zeros(4, 3, 1, 2), "text": "the dog", "id": ("v", "0", start), "orig_size": (1, 4),
              "frame_names": [f"{i:05d}" for i in idx], "num_real": real} for start, idx, real in data.eval_clips(5, 4)]
    model = KnownLogits(types.SimpleNamespace(max_text_len=8),
                        lambda f: (torch.tensor([[-1., 1.]]) + 10 * torch.arange(4.)[:, None, None]).expand(len(f), 4, 1, 2))
    (key, frames), = ev.predict(model, items, slvp.Tokenizer(spm_model), batch_size=2, progress=False)
    assert key == ("v", "0") and list(frames) == [f"{i:05d}" for i in range(5)]
    for i, position in enumerate([0, 1, 2, 3, 0]):
        assert frames[f"{i:05d}"].tolist() == [[-1 + 10 * position, -0.5 + 10 * position, 0.5 + 10 * position,
                                                1 + 10 * position]], i


def test_ytvos_submission_masks_are_logits_above_zero(tmp_path, spm_model):
    """The mask is sigmoid(logits) > 0.5, that is logits > 0: a constant logit of 0.3 (probability 0.57) paints every
    pixel 255, one of -0.3 none."""
    root = write_ytvos_valid(tmp_path / "ytvos")
    cfg = dataclasses.replace(slvp.SLVPConfig.tiny(), frame_size=(48, 64))
    for logit, value in ((0.3, 255), (-0.3, 0)):
        args = types.SimpleNamespace(data_root=root, out=tmp_path / f"o{logit}", batch_size=2, workers=0)
        model = KnownLogits(cfg, lambda f: torch.full((len(f), 4, 48, 64), logit))
        with zipfile.ZipFile(ev.bench_ytvos(args, model, slvp.Tokenizer(spm_model), "cpu")) as z:
            for name in z.namelist():
                with z.open(name) as fh:
                    assert np.unique(np.asarray(Image.open(fh))).tolist() == [value], (logit, name)


def test_davis17_runs_give_each_object_its_own_id(tmp_path, tiny_ckpt, monkeypatch):
    """Each Ref-DAVIS17 run writes the expressions of one annotator and kind (4k + a for the k-th object), all objects
    of a video into one indexed PNG: each object under its own id. With each expression "predicted" as its object's
    ground truth (the loader's obj_id, read from the text files), the two described objects of classic-car score
    J = F = 1 in every run; under one id the two would be one proposal."""
    from test_data import write_davis_downloads

    def truth(model, ds, tokenizer, *args, **kwargs):
        for vid, exp_id, _, obj_id in ds.exprs:
            frames, annos = ds.videos[vid]
            yield (vid, exp_id), {Path(f).stem: np.where(data.read_index_png(a) == obj_id, 10, -10).astype(np.float32)
                                  for f, a in zip(frames, annos)}
    root = write_davis_downloads(tmp_path / "ref-davis")
    monkeypatch.setattr(ev, "predict", truth)
    with pytest.warns(UserWarning):
        ev.main(["--bench", "davis17", "--ckpt", str(tiny_ckpt), "--data-root", str(root), "--out", str(tmp_path / "o")])
    for a in range(4):
        rows = {r[0]: r[1:] for r in csv.reader(open(tmp_path / f"o/run{a}/per-sequence_results-val.csv"))}
        assert rows["classic-car_1"] == rows["classic-car_2"] == ["1.000", "1.000"], a
        ids = np.asarray(Image.open(tmp_path / f"o/run{a}/classic-car/00000.png"))
        assert len(np.unique(ids[ids > 0])) == 2, a


def test_davis17_from_either_layout_needs_no_davis_root(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """Ref-DAVIS17 as --data-root, the original downloads or the converted layout: the ground truth is inside."""
    from test_data import DAVIS_VAL_VIDEOS, write_davis_conversion, write_davis_downloads, write_palette_png
    root = write_davis_downloads(tmp_path / "ref-davis")
    pred = tmp_path / "pred"                                  # the ground truth itself, as predictions, scores 1
    shutil.copytree(root / "DAVIS/Annotations_unsupervised/480p", pred)
    g = ev.main(["--bench", "davis17", "--data-root", str(root), "--predictions", str(pred)])
    assert g["J&F-Mean"] == pytest.approx(1) and g["J-Recall"] == pytest.approx(1)
    capsys.readouterr()
    (tmp_path / "o/run0/no-text").mkdir(parents=True)        # a folder left by another run is not scored
    workers = spy_workers(monkeypatch)
    with pytest.warns(UserWarning):                           # the skips of write_davis_downloads's quirks
        mean = ev.main(["--bench", "davis17", "--ckpt", str(tiny_ckpt), "--data-root", str(root),
                        "--out", str(tmp_path / "o"), "--workers", "3"])
    assert workers == [3, 3, 3, 3]                            # --workers reaches each run's predict
    assert "run 0: not scored, no expression: no-text" in capsys.readouterr().out
    assert set(mean) == {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}
    for a in range(4):                                        # a run per annotator and kind, each scored
        run = tmp_path / f"o/run{a}"
        assert (run / "global_results-val.csv").is_file()
        assert sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != "no-text") == \
            ["classic-car", "dogs-scale", "motorbike"]
        assert {r[0].rsplit("_", 1)[0] for r in list(csv.reader(open(run / "per-sequence_results-val.csv")))[1:]} == \
            {"classic-car", "dogs-scale", "motorbike"}
        assert sorted(p.name for p in (run / "dogs-scale").iterdir()) == [f"{t:05d}.png" for t in range(5)]
    # the benchmark's figures are the mean of the four runs': runs scored 1, 2, 4, 8 give 3.75 (their median is 3, the
    # mean of the first and last 4.5; the tiny model's runs differ by less than their tables' 3 decimals, so the scores
    # are set by hand here)
    scores = iter([1, 2, 4, 8])
    with monkeypatch.context() as m, pytest.warns(UserWarning):
        m.setattr(ev, "evaluate_davis", lambda *a, **k: (dict.fromkeys(mean, float(next(scores))), []))
        assert ev.main(["--bench", "davis17", "--ckpt", str(tiny_ckpt), "--data-root", str(root),
                        "--out", str(tmp_path / "o-mean")]) == dict.fromkeys(mean, 3.75)
    # the same data after the common conversion: the ground truth is the PNGs it moved to valid/Annotations, the
    # sequences those of the val.txt it left in DAVIS/, or without it the videos of its expression file
    conv = write_davis_conversion(tmp_path / "converted")
    write_palette_png(pred / "motorbike/00002.png", {})       # predictions not all perfect: the scores tell
    (root / "DAVIS/meta_expressions").mkdir()                 # a DAVIS tree is one, whatever else it holds
    g = ev.main(["--bench", "davis17", "--davis-root", str(root / "DAVIS"), "--predictions", str(pred)])
    scored = list(csv.reader(open(pred / "per-sequence_results-val.csv")))
    assert g["J-Mean"] < 1 and [r[0] for r in scored[1:]] == \
        [f"{v}_{k}" for v in DAVIS_VAL_VIDEOS for k in (1, 2)]
    for keep_list in (True, False):
        if not keep_list:
            (conv / "DAVIS/ImageSets/2017/val.txt").unlink()
        (pred / "per-sequence_results-val.csv").unlink()
        assert ev.main(["--bench", "davis17", "--data-root", str(conv), "--predictions", str(pred)]) == g
        assert list(csv.reader(open(pred / "per-sequence_results-val.csv"))) == scored
    with pytest.warns(UserWarning):
        assert ev.main(["--bench", "davis17", "--ckpt", str(tiny_ckpt), "--data-root", str(conv),
                        "--out", str(tmp_path / "o-conv")]) == mean
    shutil.copy(root / "DAVIS/ImageSets/2017/val.txt", conv / "DAVIS/ImageSets/2017")
    with pytest.raises(SystemExit, match=r"480p/classic-car: no ground-truth PNGs \(4 of 4 sequences"):   # the
        ev.main(["--bench", "davis17", "--ckpt", str(tiny_ckpt), "--data-root", str(conv),   # emptied DAVIS tree:
                 "--davis-root", str(conv / "DAVIS"), "--out", str(tmp_path / "o-empty")])    # stops before inference
    assert not (tmp_path / "o-empty").exists()


def test_davis17_scores_the_runs_a_partial_tree_has(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """A converted tree with annotator 1's expressions alone (ids 4k and 4k + 1): runs 2 and 3 have none. They were
    said to be "not scored", then scored on every sequence, and stopped on their missing PNGs; now they are left out
    and the mean is of runs 0 and 1 (scores set by hand: 2 and 5 give 3.5), said so. No expression at all: one line."""
    from test_data import write_davis_conversion
    conv = write_davis_conversion(tmp_path / "converted")
    meta_file = conv / "meta_expressions/valid/meta_expressions.json"
    meta = json.loads(meta_file.read_text())
    for v in meta["videos"].values():
        v["expressions"] = {e: x for e, x in v["expressions"].items() if int(e) % 4 < 2}
    meta_file.write_text(json.dumps(meta))
    argv = ["--bench", "davis17", "--ckpt", str(tiny_ckpt), "--data-root", str(conv)]
    with pytest.warns(UserWarning):                           # the empty expression of write_davis_conversion
        g = ev.main([*argv, "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "run 2: not scored, no expression in any sequence" in out and "run 3: not scored, no expression in" in out
    assert "Ref-DAVIS17, mean of the 2 runs scored, not the benchmark's four" in out
    assert [p.name for p in sorted((tmp_path / "o").iterdir())] == ["run0", "run1"]      # nothing of runs 2, 3
    scores = iter([2, 5])
    with monkeypatch.context() as m, pytest.warns(UserWarning):
        m.setattr(ev, "evaluate_davis", lambda *a, **k: (dict.fromkeys(g, float(next(scores))), []))
        assert ev.main([*argv, "--out", str(tmp_path / "o-mean")]) == dict.fromkeys(g, 3.5)
    for v in meta["videos"].values():
        v["expressions"] = {}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="no expression of a sequence of .* in any run; nothing to score"):
        ev.main([*argv, "--out", str(tmp_path / "o-none")])


def test_visor_objects_not_in_the_first_frame_are_not_scored(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """VISOR val through the model: object 2 of the mapping is missing from the sequence's first annotated frame (as
    an object too small at 480p is), so the evaluator counts object 1 alone. Its prediction is left out of the PNGs
    and of the scores, with a line saying so, where the run used to stop ("predictions use id 2, above the 1
    objects"). Frame 5 has no PNG, as the conversion writes none where no object is visible: predicted, not scored."""
    from test_data import write_jpeg, write_palette_png
    root, seq = tmp_path / "VISOR_2022", "P01_107_seq_00001"
    for t in range(6):
        write_jpeg(root / f"JPEGImages/480p/{seq}/{t:05d}.jpg", 40 + 20 * t)
        if t < 5:
            write_palette_png(root / f"Annotations/480p/{seq}/{t:05d}.png", {1: (2, 2, 12, 12), 2: None if t == 0 else (20, 8, 30, 18)})
    (root / "ImageSets/2022").mkdir(parents=True)
    (root / "ImageSets/2022/val.txt").write_text(seq + "\n")
    (root / "val_data_mapping.json").write_text(json.dumps({seq: {"1": "hand:left", "2": "board:chopping"}}))
    workers = spy_workers(monkeypatch)
    g = ev.main(["--bench", "visor", "--ckpt", str(tiny_ckpt), "--data-root", str(root), "--out", str(tmp_path / "o"),
                 "--workers", "3"])
    assert workers == [3]
    assert f"not scored, ids above their sequence's first annotated frame's: 1 objects ({seq} 2)" in capsys.readouterr().out
    out = tmp_path / "o/visor"
    assert [r[0] for r in csv.reader(open(out / "per-sequence_results-val.csv"))] == ["Sequence", f"{seq}_1"]
    assert len(list((out / seq).glob("*.png"))) == 6                                        # frame 5 predicted too
    assert all(np.asarray(Image.open(p)).max() <= 1 for p in (out / seq).glob("*.png"))   # object 2 not painted
    assert 0 <= g["J&F-Mean"] <= 1
    (root / "val_data_mapping.json").write_text(json.dumps({seq: {"2": "board:chopping"}}))   # nothing left to score
    with pytest.raises(SystemExit, match="no object of the mapping file is in its sequence's first annotated frame"):
        ev.main(["--bench", "visor", "--ckpt", str(tiny_ckpt), "--data-root", str(root), "--out", str(tmp_path / "o2")])


def test_visor_scores_each_object_against_its_own_id(tmp_path, spm_model):
    """VISOR's ids are known: each expression's mask is scored against its own object, with no matching. A stand-in
    model paints object 1's box for "circle red" (object 1) and object 2's for "square blue" (object 2): J = F = 1 for
    both; with the two swapped, J = F = 0 for both (the boxes are far apart; matched, as DAVIS's unsupervised
    protocol would, the swapped ids would still score 1)."""
    from test_data import CFG, H, W, write_jpeg, write_palette_png
    root, seq = tmp_path / "VISOR_2022", "P01_107_seq_00001"
    boxes = {1: (4, 4, 20, 20), 2: (40, 24, 60, 44)}                          # x1, y1, x2, y2
    for t in range(5):
        write_jpeg(root / f"JPEGImages/480p/{seq}/{t:05d}.jpg", 40 + 20 * t)
        write_palette_png(root / f"Annotations/480p/{seq}/{t:05d}.png", boxes)
    (root / "ImageSets/2022").mkdir(parents=True)
    (root / "ImageSets/2022/val.txt").write_text(seq + "\n")
    (root / "val_data_mapping.json").write_text(json.dumps({seq: {"1": "circle:red", "2": "square:blue"}}))
    tok = slvp.Tokenizer(spm_model)
    first = tok(["circle red"], max_len=CFG.max_text_len)[0][0]
    masks = {}
    for k, (x1, y1, x2, y2) in boxes.items():
        masks[k] = torch.full((H, W), -1.0)
        masks[k][y1:y2, x1:x2] = 1.0
    for swapped, expected in ((False, 1.0), (True, 0.0)):
        def logits(ids, swapped=swapped):
            return torch.stack([masks[1 if torch.equal(i, first) != swapped else 2] for i in ids])[:, None].expand(
                len(ids), CFG.num_frames, H, W)
        model = KnownLogits(CFG, None)
        model.forward = lambda frames, ids, mask, logits=logits: {"masks": logits(ids)}
        args = types.SimpleNamespace(data_root=root, out=tmp_path / f"o{swapped}", batch_size=2, workers=0)
        g = ev.bench_visor(args, model, tok, "cpu")
        assert (g["J-Mean"], g["F-Mean"]) == (expected, expected), swapped


def test_synthetic_scores_of_an_oracle(spm_model, tmp_path):
    """synthetic_scores on a "model" that returns each clip's true masks (found by its frames) scores J = F = 1; the
    complement J = 0 (and F = 1), the truth of another clip less than 0.5: each clip's against its own truth."""
    cfg = slvp.SLVPConfig.tiny()
    ds = data.build_dataset("synthetic", None, "val", cfg, train=False, size=8, seed=0)
    truth = {ds[i]["frames"].numpy().tobytes(): ds[i]["masks"] for i in range(len(ds))}
    assert all(m.any((1, 2)).all() for m in truth.values())          # the target is in every frame of every clip
    keys = list(truth)

    def mask_of(how, k):
        return {"true": truth[k], "complement": ~truth[k], "another": truth[keys[(keys.index(k) + 1) % len(keys)]]}[how]

    def Oracle(how):                                                  # logits of +-0.01: the mask is logits > 0
        return KnownLogits(cfg, lambda frames: torch.stack([0.02 * mask_of(how, f.numpy().tobytes()).float() - 0.01
                                                            for f in frames]))
    tok = slvp.Tokenizer(spm_model)
    assert ev.synthetic_scores(Oracle("true"), tok, n=8) == {"J": 1.0, "F": 1.0, "J&F": 1.0}
    # the complement has the mask's boundary map (test_boundary_map_at_the_frame_edge): J = 0 and F = 1
    assert ev.synthetic_scores(Oracle("complement"), tok, n=8) == {"J": 0.0, "F": 1.0, "J&F": 0.5}
    assert ev.synthetic_scores(Oracle("another"), tok, n=8)["J&F"] < 0.5
    # its picture: the oracle's rows outline the true masks, those of the complement do not
    rows = [{**ds[i], "id": (f"{ds[i]['id'][0]}, {kind}", *ds[i]["id"][1:])}
            for i in range(4) for kind in ("predicted", "true")]
    expected = np.asarray(data.contact_sheet(rows))
    for how, same in (("true", True), ("complement", False)):
        ev.synthetic_scores(Oracle(how), tok, n=8, sheet=tmp_path / f"{how}.png")
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{how}.png").convert("RGB")), expected) == same, how


def test_synthetic_bench_and_demo(tmp_path, tiny_ckpt):
    s = ev.main(["--bench", "synthetic", "--ckpt", str(tiny_ckpt), "--num-clips", "4", "--out", str(tmp_path / "s")])
    assert set(s) == {"J", "F", "J&F"} and all(0 <= v <= 1 for v in s.values())
    assert Image.open(tmp_path / "s/synthetic.png").size[0] > 4 * 48
    video = tmp_path / "video"
    video.mkdir()
    for t in range(6):  # 6 frames of 30x40: two clips of T=4, the second padded
        Image.fromarray(np.full((30, 40, 3), 40 * t, np.uint8)).save(video / f"{t:03d}.jpg")
    out = ev.main(["--ckpt", str(tiny_ckpt), "--video", str(video), "--text", "the red circle", "--out", str(tmp_path / "d")])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6 and Image.open(pngs[0]).size == (40, 30)
    gif = Image.open(out / "demo.gif")
    assert gif.n_frames == 6
    # a shorter video into the same --out: its 2 overlays, not those and the first video's last 4 (they stayed); a
    # text longer than the model reads, and words the tokenizer never saw, are said
    for t in range(2, 6):
        (video / f"{t:03d}.jpg").unlink()
    (out / "notes.txt").write_text("a file of the user's")
    with pytest.warns(data.Note) as notes:
        ev.main(["--ckpt", str(tiny_ckpt), "--video", str(video), "--text", "the red circle moves left " * 8 + "红色",
                 "--out", str(tmp_path / "d")])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "demo.gif", "notes.txt"]
    said = [str(n.message) for n in notes]
    assert said[0].startswith("--text is ") and said[0].endswith("pieces; the model reads its first 31 and </s>")
    assert said[1].startswith("--text: 1 of its") and "pieces are unknown to" in said[1]


def test_a_file_without_a_video_stream_is_named_as_such(tmp_path, tiny_ckpt):
    """An audio file given as the demo's --video (or as an S-MiT video) failed with "unreadable video (tuple index
    out of range)"."""
    av = pytest.importorskip("av")
    audio = tmp_path / "speech.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    with pytest.raises(SystemExit, match=r"speech.wav: no video stream \(an audio file\?\); expected a video file"):
        ev.main(["--ckpt", str(tiny_ckpt), "--video", str(audio), "--text", "the red circle", "--out", str(tmp_path)])
    with pytest.raises(data.BadFile, match=r"speech.wav: no video stream \(an audio file\?\); expected an .mp4"):
        data._count_video_frames(audio)


def test_demo_overlays_the_predicted_mask(tmp_path, spm_model):
    """The demo on a stand-in model that segments the bright pixels of the frames it is given (logits: grey level in
    [0, 1] minus 0.5), 5 frames of 32x48 (the model's size: nothing resampled), a bright rectangle (230) on a dark
    ground (30) moving 2 px a frame. Inside the rectangle, away from its edge, the overlay is the blend 0.5 frame +
    0.5 (255, 40, 40), rounded down: (242, 135, 135); along its edge the colour itself; 2 px and more outside it, the
    frame as it was."""
    cfg = slvp.SLVPConfig.tiny()
    H, W = cfg.frame_size
    video = tmp_path / "video"
    video.mkdir()
    for t in range(5):
        f = np.full((H, W, 3), 30, np.uint8)
        f[8:20, 10 + 2 * t:30 + 2 * t] = 230
        Image.fromarray(f).save(video / f"{t:03d}.png")
    model = KnownLogits(cfg, lambda frames: frames.mean(2) - 0.5)               # [B, T, H, W]
    args = types.SimpleNamespace(video=video, text="the red circle", out=tmp_path / "d")
    out = ev.demo(args, model, slvp.Tokenizer(spm_model), "cpu")
    for t in range(5):
        pic = np.asarray(Image.open(out / f"{t:05d}.png")).astype(int)
        x1, x2 = 10 + 2 * t, 30 + 2 * t
        assert (pic[9:19, x1 + 1:x2 - 1] == [242, 135, 135]).all(), t
        far = np.ones((H, W), bool)
        far[6:22, x1 - 2:x2 + 2] = False
        assert (pic[far] == 30).all(), t
        edge = np.zeros((H, W), bool)
        edge[7:21, x1 - 1:x2 + 1] = True
        edge[9:19, x1 + 1:x2 - 1] = False
        assert (pic[edge] == [255, 40, 40]).all(1).sum() >= 2 * (x2 - x1), t     # the outline drawn around it
    assert Image.open(out / "demo.gif").n_frames == 5


def test_flow_colour_wheel():
    flow = np.zeros((2, 1, 4), np.float32)
    flow[0, 0] = [1, -1, 0, 0]                                       # right, left, down, still
    flow[1, 0] = [0, 0, 1, 0]
    c = ev.flow_to_color(flow).astype(int)[0]
    assert tuple(c[3]) == (255, 255, 255)                            # no motion is white
    assert len({tuple(x) for x in c[:3]}) == 3                       # directions get different hues
    assert (c[0] - c[1]).__abs__().sum() > 200                       # opposite directions far apart
    # the Middlebury coding worked by hand (hue index (atan2(-v, -u) / pi + 1) / 2 * 54 on the 55-hue wheel, image y
    # down): right 0 (red), down 13.5 (between 255 * 13/15 and 255 * 14/15 green: orange-yellow), left 27 (cyan-blue,
    # green 255 - 255 * 2/11), up 40.5 (blue-magenta, red between 255 * 4/13 and 255 * 5/13)
    flow = np.array([[[1, 0, -1, 0]], [[0, 1, 0, -1]]], np.float32)
    c = ev.flow_to_color(flow).astype(int)[0]
    assert tuple(c[0]) == (255, 0, 0)
    assert c[1][0] == 255 and 229 <= c[1][1] <= 230 and c[1][2] == 0
    assert c[2][0] == 0 and 208 <= c[2][1] <= 209 and c[2][2] == 255
    assert 87 <= c[3][0] <= 89 and c[3][1] == 0 and c[3][2] == 255


# ---------------------------------------------------------------------------------------------- from a mutation run

def test_demo_keeps_the_order_of_frames_numbered_without_zero_padding(tmp_path, spm_model):
    """Frames named as ffmpeg's %d writes them (0.png, 1.png, ..., 11.png; data.frame_order's docstring): the demo's
    overlay t is frame t, not the t-th name in text order (0, 1, 10, 11, 2, ...). The stand-in model predicts no mask,
    so each overlay is its frame as it was: frame t flat at grey 10 + 20 t."""
    cfg = slvp.SLVPConfig.tiny()
    H, W = cfg.frame_size
    video = tmp_path / "video"
    video.mkdir()
    for t in range(12):
        Image.fromarray(np.full((H, W, 3), 10 + 20 * t, np.uint8)).save(video / f"{t}.png")
    model = KnownLogits(cfg, lambda frames: torch.full(frames.shape[:2] + frames.shape[-2:], -1.0))
    args = types.SimpleNamespace(video=video, text="the red circle", out=tmp_path / "d")
    out = ev.demo(args, model, slvp.Tokenizer(spm_model), "cpu")
    levels = [int(np.asarray(Image.open(out / f"{t:05d}.png")).mean()) for t in range(12)]
    assert levels == [10 + 20 * t for t in range(12)]


def test_a_checkpoint_of_exactly_its_tokenizers_pieces_loads(tmp_path, spm_model):
    """train.py gives the model one token id per piece of its tokenizer (vocab_size = len(tokenizer)): such a checkpoint
    loads, and the largest id the tokenizer can give, len - 1, has its embedding row; a model of one id fewer than the
    pieces is refused (nn.Embedding(n) takes ids 0 .. n - 1)."""
    n = len(slvp.Tokenizer(spm_model))
    for vocab, ok in ((n, True), (n - 1, False)):
        path = tmp_path / str(vocab) / "ckpt.safetensors"
        path.parent.mkdir()
        slvp.save_checkpoint(path, slvp.SLVP(dataclasses.replace(slvp.SLVPConfig.tiny(), vocab_size=vocab), task="rvos"))
        shutil.copy(spm_model, path.parent / "spm.model")
        if ok:
            model, tok = ev.load_model_and_tokenizer(path, None, "cpu")
            assert model.cfg.vocab_size == len(tok) == n
            model.text.embed(torch.tensor([n - 1]))
        else:
            with pytest.raises(ValueError, match=f"has {n} pieces, more than the {n - 1}"):
                ev.load_model_and_tokenizer(path, None, "cpu")


# ---------------------------------------------------------------------------------------------- the demo on users' videos

def quadrants(H=80, W=48):
    """An upright portrait frame of four flat colours: red top-left, green top-right, blue bottom-left, yellow."""
    P = np.zeros((H, W, 3), np.uint8)
    P[:H // 2, :W // 2], P[:H // 2, W // 2:] = (255, 0, 0), (0, 255, 0)
    P[H // 2:, :W // 2], P[H // 2:, W // 2:] = (0, 0, 255), (255, 255, 0)
    return P


def no_mask_demo(video, tmp_path, spm_model, name="d", text="the red circle"):
    """The demo with a stand-in model that predicts no mask: each overlay is its frame as the demo read it."""
    model = KnownLogits(slvp.SLVPConfig.tiny(), lambda frames: torch.full(frames.shape[:2] + frames.shape[-2:], -1.0))
    args = types.SimpleNamespace(video=video, text=text, out=tmp_path / name)
    return ev.demo(args, model, slvp.Tokenizer(spm_model), "cpu")


def test_demo_names_a_video_that_fails_in_decoding(tmp_path, spm_model):
    """A video whose fourth frame cannot be decoded stops the demo with an error naming the file (as data's loaders
    name it), not the decoder's bare InvalidDataError, after the overlays of the frames before it."""
    pytest.importorskip("av")
    from test_data import write_cut_video
    video = write_cut_video(tmp_path / "v.mkv")
    with pytest.raises(ValueError, match=r"v.mkv: unreadable video \(.*\); expected a video file or a folder of frames"):
        no_mask_demo(video, tmp_path, spm_model)


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_demo_shows_a_rotated_video_as_players_do(rotation, tmp_path, spm_model):
    """A phone's portrait video stores landscape pixels and a display matrix that turns them (FFmpeg's, and PyAV's
    frame.rotation: degrees counterclockwise; an iPhone's -90 is turned 90 degrees clockwise, as ffmpeg's autorotate and
    every player show it). Stored pixels S = the upright frame P turned by -rotation (np.rot90: counterclockwise), PNG
    in .mov (lossless): each overlay is P, upright, not S."""
    P = quadrants()
    S = np.ascontiguousarray(np.rot90(P, -rotation // 90))
    video = tmp_path / "phone.mov"
    write_video_file(video, [S] * 5, "png", rate=25, rotation=rotation)
    out = no_mask_demo(video, tmp_path, spm_model)
    for t in range(5):
        assert np.array_equal(np.asarray(Image.open(out / f"{t:05d}.png")), P), t
    assert Image.open(out / "demo.gif").size == (P.shape[1], P.shape[0])


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, 1), (8, -1)])
def test_demo_turns_photos_as_their_exif_orientation_says(orientation, turn, tmp_path, spm_model):
    """A phone's photos store the sensor's pixels and an EXIF orientation (tag 0x0112; the EXIF standard: 3 = shown
    turned 180 degrees, 6 = turned 90 degrees clockwise, 8 = 90 counterclockwise). Stored pixels = the upright frame P
    turned the other way (np.rot90: counterclockwise), JPEG: each overlay is P, up to JPEG's loss, not sideways."""
    P = quadrants()
    video = tmp_path / "photos"
    video.mkdir()
    for t in range(3):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.ascontiguousarray(np.rot90(P, turn))).save(video / f"IMG_{t:04d}.JPG", quality=95, exif=exif)
    out = no_mask_demo(video, tmp_path, spm_model)
    for t in range(3):
        pic = np.asarray(Image.open(out / f"{t:05d}.png")).astype(int)
        assert pic.shape == P.shape and np.abs(pic - P).mean() < 4, t


def test_demo_refuses_to_read_the_folder_it_clears(tmp_path, spm_model, monkeypatch):
    """Frames extracted as %05d.png into the demo's own folder (--out X --video X/demo), or one of them as --video,
    also as a path relative to the working folder (--out absolute): the earlier overlays were deleted first, the
    frames with them; it stops before deleting anything now."""
    video = tmp_path / "d/demo"
    video.mkdir(parents=True)
    for t in range(3):
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(video / f"{t:05d}.png")
    monkeypatch.chdir(tmp_path)
    for given in (video, video / "00001.png", Path("d/demo"), Path("d/demo/00001.png")):
        with pytest.raises(ValueError, match=f"--video {given} is in the demo's folder, {video}, whose earlier overlays"):
            no_mask_demo(given, tmp_path, spm_model)
    assert sorted(p.name for p in video.iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_demo_frames_of_another_size_fail_naming_the_file(tmp_path, spm_model):
    """The demo stops in its first clip, before any overlay is written: an earlier demo's overlay and demo.gif are gone
    (not left as if this video's), the user's own cover.png in the folder stays."""
    video = tmp_path / "frames"
    video.mkdir()
    for t in range(5):
        Image.fromarray(np.zeros((48, 66 if t == 2 else 64, 3), np.uint8)).save(video / f"{t:05d}.png")
    out = tmp_path / "d/demo"
    out.mkdir(parents=True)
    for name in ("00007.png", "cover.png", "demo.gif"):
        (out / name).write_bytes(b"earlier")
    with pytest.raises(ValueError, match=r"frames/00002.png: 66x48, the first frame 64x48"):
        no_mask_demo(video, tmp_path, spm_model)
    assert sorted(p.name for p in out.iterdir()) == ["cover.png"]


def test_the_demo_notes_a_text_cut_by_one_piece(tmp_path, spm_model):
    """A --text of exactly L = 32 pieces keeps 31 and </s> (the Tokenizer's first L - 1 pieces and </s>): it is cut,
    and said; one of 31 pieces is read whole and says nothing. "falls" is one piece of the test tokenizer, so
    "falls " * n is n pieces by construction."""
    tok = slvp.Tokenizer(spm_model)
    assert slvp.SLVPConfig.tiny().max_text_len == 32 and tok.sp.encode("falls", out_type=str) == ["\u2581falls"]
    video = tmp_path / "frames"
    video.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(video / "00000.png")
    for n, said in ((32, ["--text is 32 pieces; the model reads its first 31 and </s>"]), (31, [])):
        ids, _ = tok([" ".join(["falls"] * n)], max_len=32)
        assert ids.shape == (1, min(n + 1, 32)) and ids[0, -1] == tok.eos_id    # 32 pieces: the last one dropped
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            no_mask_demo(video, tmp_path, spm_model, name=f"o{n}", text=" ".join(["falls"] * n))
        assert [str(w.message) for w in caught if issubclass(w.category, data.Note)] == said, n


def test_demo_reads_and_writes_one_clip_at_a_time(tmp_path, spm_model, monkeypatch):
    """A long video is never held whole (HEAD held every frame twice at full size: 2.4 GB for 120 frames of 1080p):
    when the model runs on clip k, at most (k + 1) T frames have been read and the overlays of clips before it are on
    disk. demo.gif's frames are at most GIF_SIDE pixels on their long side; macOS's ._ files are left out."""
    cfg = slvp.SLVPConfig.tiny()
    T = cfg.num_frames
    video = tmp_path / "frames"
    video.mkdir()
    for t in range(3 * T):
        Image.fromarray(np.full((600, 1000, 3), 20 * t, np.uint8)).save(video / f"{t:05d}.jpg")
    (video / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    reads, seen = [], []
    read_image = data.read_image
    monkeypatch.setattr(data, "read_image", lambda p: reads.append(p) or read_image(p))
    out_dir = tmp_path / "d" / "demo"

    def logits(frames):
        seen.append((len(reads), len(list(out_dir.glob("0*.png")))))
        return torch.full(frames.shape[:2] + frames.shape[-2:], -1.0)
    args = types.SimpleNamespace(video=video, text="the red circle", out=tmp_path / "d")
    out = ev.demo(args, KnownLogits(cfg, logits), slvp.Tokenizer(spm_model), "cpu")
    assert seen == [((k + 1) * T, k * T) for k in range(3)]
    assert len(list(out.glob("0*.png"))) == 3 * T
    assert Image.open(out / "demo.gif").size == (ev.GIF_SIDE, round(600 * ev.GIF_SIDE / 1000))


def test_demo_gif_plays_at_the_videos_rate(tmp_path, spm_model):
    """demo.gif's frames last 1000 / fps ms (25 fps: 40 ms), not 100 ms whatever the video (2.5 times too slow)."""
    video = tmp_path / "v.mov"
    write_video_file(video, [np.full((32, 48, 3), 40 * t, np.uint8) for t in range(4)], "png", rate=25)
    gif = Image.open(no_mask_demo(video, tmp_path, spm_model) / "demo.gif")
    assert gif.n_frames == 4 and gif.info["duration"] == 40
