"""
Evaluation for SLVP: the DAVIS 2017 region (J) and boundary (F) measures, the R-VOS protocols, submission files,
pictures and a demo.

    python eval.py --bench davis17 --davis-root DAVIS --predictions DIR   # score a folder of indexed PNGs, no model
    python eval.py --bench davis17 --ckpt CKPT --data-root REF_DAVIS   # the four Ref-DAVIS17 runs (either layout)
    python eval.py --bench ytvos --ckpt CKPT --data-root REF_YTVOS      # the submission zip of the 202 valid videos
    python eval.py --bench visor --ckpt CKPT --data-root VISOR_2022
    python eval.py --bench synthetic --ckpt CKPT                        # the embedded benchmark, no data needed
    python eval.py --ckpt CKPT --video V --text "the red circle"         # demo: overlays and an animated GIF

J and F follow the DAVIS 2017 evaluator (davis2017-evaluation): J is the IoU with void pixels (255) left out and
1 when both masks are empty; F matches the 1-pixel boundary maps of prediction and ground truth within a disk of
radius ceil(0.008 * image diagonal). Per object: mean, recall (fraction of frames above 0.5) and decay (first
quarter minus last quarter); global numbers are means over all objects of all sequences. numpy and Pillow only.
"""
import argparse
import csv
import itertools
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import data

# ----------------------------------------------------------------------------------------------------------
# J and F (DAVIS 2017)
# ----------------------------------------------------------------------------------------------------------


def same_shapes(gt, pred, void):
    """gt, pred (and void) as bool arrays (non-zero = in the mask, as the DAVIS evaluator's astype(bool)) of one
    shape: the evaluator asserts it, where numpy would broadcast a [H, W] or one-frame prediction over the frames."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    for name, x in (("gt", gt), ("pred", pred)):
        if x.dtype.kind == "f":   # probabilities or logits: every non-zero value would count
            raise ValueError(f"{name} is {x.dtype}; expected binary masks (e.g. logits > 0)")
    gt, pred = gt.astype(bool, copy=False), pred.astype(bool, copy=False)
    void = None if void is None else np.asarray(void, dtype=bool)
    for name, x in (("pred", pred), ("void", void)):
        if x is not None and x.shape != gt.shape:
            raise ValueError(f"{name} {x.shape} and gt {gt.shape} differ in shape; expected masks [T, H, W] or [H, W] "
                             f"alike")
    return gt, pred, void


def db_eval_iou(gt, pred, void=None):
    """J per frame: gt, pred Bool[T, H, W] (or [H, W]); void pixels are left out; 1 where both are empty."""
    gt, pred, void = same_shapes(gt, pred, void)
    keep = ~void if void is not None else True
    inter = np.sum(gt & pred & keep, axis=(-2, -1))
    union = np.sum((gt | pred) & keep, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return j


def seg2bmap(seg):
    """1-pixel boundary map of a binary mask: a pixel is boundary where it differs from its east, south or
    south-east neighbour (the last row/column compare along the edge only), as in the DAVIS evaluator."""
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk_dilate(mask, r):
    """Binary dilation by the disk {(dx, dy): dx^2 + dy^2 <= r^2}, inside the mask's bounding box grown by r:
    for each row offset dy, a horizontal window of half-width floor(sqrt(r^2 - dy^2)) (a difference of cumulative
    sums over a zero-padded copy), shifted by dy and OR-ed."""
    r = int(r)
    out = np.zeros_like(mask)
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(ys) == 0:
        return out
    y0, y1 = max(ys[0] - r, 0), min(ys[-1] + r + 1, mask.shape[0])
    x0, x1 = max(xs[0] - r, 0), min(xs[-1] + r + 1, mask.shape[1])
    m = mask[y0:y1, x0:x1]
    H, W = m.shape
    cs = np.zeros((H, W + 2 * r + 1), np.int32)                     # cs[:, k] = sum of padded[:, :k]
    np.cumsum(m, axis=1, out=cs[:, r + 1:r + 1 + W])
    cs[:, r + 1 + W:] = cs[:, r + W:r + 1 + W]
    box = out[y0:y1, x0:x1]
    rows = {}
    for dy in range(-min(r, H - 1), min(r, H - 1) + 1):
        w = math.isqrt(r * r - dy * dy)
        if w not in rows:  # window [x - w, x + w] of the row
            rows[w] = (cs[:, r + 1 + w:r + 1 + w + W] - cs[:, r - w:r - w + W]) > 0
        h = rows[w]
        if dy >= 0:
            box[:H - dy] |= h[dy:]
        else:
            box[-dy:] |= h[:H + dy]
    return out


def boundary_radius(shape, bound_th=0.008):
    return bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape))


def boundaries(masks, void=None, bound_th=0.008):
    """Per frame: the boundary map of the mask (void pixels removed first) and its disk dilation."""
    r = boundary_radius(masks.shape[-2:], bound_th)
    keep = ~void if void is not None else np.ones_like(masks)
    b = np.stack([seg2bmap(m & k) for m, k in zip(masks, keep)])
    return b, np.stack([disk_dilate(x, r) for x in b])


def f_from_boundaries(pred_b, pred_dil, gt_b, gt_dil):
    """F per frame from precomputed boundaries. The DAVIS conventions for empty boundaries follow from taking
    P = 1 when nothing is predicted and R = 1 when nothing is true (an empty dilation matches nothing):
    none predicted, some true: P=1, R=0, F=0; some predicted, none true: P=0, R=1, F=0; neither: F=1."""
    n_p = pred_b.sum(axis=(-2, -1))
    n_g = gt_b.sum(axis=(-2, -1))
    precision = np.where(n_p > 0, (pred_b & gt_dil).sum(axis=(-2, -1)) / np.maximum(n_p, 1), 1.0)
    recall = np.where(n_g > 0, (gt_b & pred_dil).sum(axis=(-2, -1)) / np.maximum(n_g, 1), 1.0)
    denom = precision + recall
    return np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)


def db_eval_boundary(gt, pred, void=None, bound_th=0.008):
    """F per frame for Bool[T, H, W] masks; a scalar for [H, W] masks (the evaluator's f_measure)."""
    gt, pred, void = same_shapes(gt, pred, void)
    if gt.ndim == 2:
        return db_eval_boundary(gt[None], pred[None], None if void is None else void[None], bound_th)[0]
    if gt.ndim != 3:
        raise ValueError(f"masks of {gt.ndim} dimensions; expected [T, H, W] or [H, W]")
    return f_from_boundaries(*boundaries(pred, void, bound_th), *boundaries(gt, void, bound_th))


def db_statistics(values):
    """Mean, recall (fraction > 0.5) and decay (mean of the first quarter of the frames minus the last)."""
    values = np.asarray(values, np.float64)
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return float(np.nanmean(values)), float(np.nanmean(values > 0.5)), float(np.nanmean(bins[0]) - np.nanmean(bins[3]))


def linear_sum_assignment(score):
    """Maximum-score assignment for a [rows, cols] matrix: (row_ind, col_ind), min(rows, cols) pairs sorted by row.
    The shortest augmenting path method (Crouse, 2016) as scipy.optimize.linear_sum_assignment(-score) runs it,
    with its order of search and its choice among ties, so that tied scores pair as in the official evaluator."""
    cost = -np.asarray(score, np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T                                               # [n, m], n <= m
    n, m = cost.shape
    u, v = np.zeros(n), np.zeros(m)                                 # dual variables of rows and columns
    col4row, row4col = np.full(n, -1), np.full(m, -1)
    for cur in range(n):                                            # add row `cur` by a shortest augmenting path
        cost_to = np.full(m, np.inf)                                # shortest path cost from `cur` to each column
        path = np.full(m, -1)                                       # the row before each column on that path
        rows_seen, cols_seen = np.zeros(n, bool), np.zeros(m, bool)
        remaining = list(range(m - 1, -1, -1))                      # columns not reached (a constant cost: j = i)
        i, min_val, sink = cur, 0.0, -1
        while sink < 0:
            rows_seen[i] = True
            lowest, index = np.inf, -1
            for it, j in enumerate(remaining):
                r = min_val + cost[i, j] - u[i] - v[j]
                if r < cost_to[j]:
                    path[j], cost_to[j] = i, r
                if cost_to[j] < lowest or (cost_to[j] == lowest and row4col[j] < 0):  # a tie: a free column
                    lowest, index = cost_to[j], it
            min_val = lowest
            j = remaining[index]
            if row4col[j] < 0:
                sink = j                                            # a free column: the path ends
            else:
                i = row4col[j]                                      # go on from the row that holds it
            cols_seen[j] = True
            remaining[index] = remaining[-1]
            remaining.pop()
        u[cur] += min_val
        for r in np.flatnonzero(rows_seen):
            if r != cur:
                u[r] += min_val - cost_to[col4row[r]]
        v[cols_seen] -= min_val - cost_to[cols_seen]
        j = sink
        while True:                                                 # flip the path's pairs
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    if transposed:
        order = np.argsort(col4row)
        return col4row[order], order
    return np.arange(n), col4row


MAX_PROPOSALS = 20  # the unsupervised protocol's limit on predicted ids per sequence


def evaluate_objects(gt, pred, void=None, match=True, max_proposals=MAX_PROPOSALS):
    """gt Bool[n_gt, T, H, W], pred Bool[n_pred, T, H, W]. With match (the unsupervised protocol) predicted ids are
    assigned to true ids by the Hungarian method on the mean of J and F; without it pred[k] is scored against gt[k].
    Returns J, F as [n_gt, T] arrays, in the evaluator's order (matched pairs sorted by predicted id)."""
    if np.shape(pred)[1:] != np.shape(gt)[1:] or np.ndim(gt) != 4:
        raise ValueError(f"gt {np.shape(gt)} and pred {np.shape(pred)}: expected [objects, T, H, W] with the same T, H, "
                         f"W")
    if match and len(pred) > max_proposals:
        raise ValueError(f"{len(pred)} predicted ids: more than the {max_proposals} proposals the protocol allows")
    if len(pred) < len(gt):
        pred = np.concatenate([pred, np.zeros((len(gt) - len(pred), *pred.shape[1:]), bool)])
    if not match and len(pred) > len(gt):
        raise ValueError(f"predictions use id {len(pred)}, above the {len(gt)} objects of the sequence")
    if len(gt) == 0:                                 # no object in the first frame: nothing to score
        return np.zeros((0, gt.shape[1])), np.zeros((0, gt.shape[1]))
    if not match:
        Jm = np.stack([db_eval_iou(g, p, void) for g, p in zip(gt, pred)])
        bg = [boundaries(g, void) for g in gt]
        Fm = np.stack([f_from_boundaries(*boundaries(p, void), *b) for p, b in zip(pred, bg)])
        return Jm, Fm
    bg = [boundaries(g, void) for g in gt]
    # one proposal's boundary maps at a time: all 20 proposals' of a 104-frame 480p sequence are 1.7 GB
    J, Fm = [], []                                                                   # [n_pred, n_gt, T]
    for p in pred:
        b_p = boundaries(p, void)
        J.append([db_eval_iou(g, p, void) for g in gt])
        Fm.append([f_from_boundaries(*b_p, *b_g) for b_g in bg])
    J, Fm = np.stack(J), np.stack(Fm)
    rows, cols = linear_sum_assignment((J.mean(2) + Fm.mean(2)) / 2)
    return J[rows, cols], Fm[rows, cols]


# ----------------------------------------------------------------------------------------------------------
# DAVIS-style folders: ground truth, predictions, the official tables
# ----------------------------------------------------------------------------------------------------------

def split_ids(frames, n=None):
    """Int[T, H, W] -> Bool[n, T, H, W], one mask per id 1..n (default n: the largest id in any frame)."""
    n = int(frames.max()) if n is None else n
    return frames[None] == np.arange(1, n + 1)[:, None, None, None]


def gt_frames(gt_dir, seq):
    """The names of a sequence's annotated frames, gt_dir/<seq>/<name>.png, in the evaluator's order."""
    names = sorted(Path(n).stem for n in data.listed(Path(gt_dir) / seq, "*.png"))
    if not names:
        raise FileNotFoundError(f"{Path(gt_dir) / seq}: no ground-truth PNGs")
    return names


def first_frame_objects(gt_dir, seq):
    """How many objects the evaluator scores in a sequence: the largest id of its first annotated frame (void aside)."""
    first = data.read_index_png(Path(gt_dir) / seq / f"{gt_frames(gt_dir, seq)[0]}.png")
    return int(np.where(first == 255, 0, first).max())


PROGRESS_LINE = [False]  # a progress line ("\r3/8 clips, ETA 2s") is open: an error must start a new one


def show_progress(text):
    print("\r" + text, end="", file=sys.stderr, flush=True)
    PROGRESS_LINE[0] = True


def end_progress():
    print(file=sys.stderr)
    PROGRESS_LINE[0] = False


def evaluate_davis(gt_dir, sequences, pred_dir, match=True, progress=True):
    """The DAVIS 2017 evaluation of pred_dir/<seq>/<frame>.png against gt_dir/<seq>/<frame>.png (255 = void).
    Returns (global row dict, per-object rows)."""
    J, F, rows = {"M": [], "R": [], "D": []}, {"M": [], "R": [], "D": []}, []
    t0 = time.time()
    for s, seq in enumerate(sequences):
        names = gt_frames(gt_dir, seq)
        gt = np.stack([data.read_index_png(Path(gt_dir) / seq / f"{n}.png") for n in names])
        void = gt == 255
        gt = np.where(void, 0, gt)
        preds = []
        for n in names:
            p = Path(pred_dir) / seq / f"{n}.png"
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing prediction (the sequence has {len(names)} annotated frames)")
            preds.append(data.read_index_png(p))
            if preds[-1].shape != gt.shape[1:]:
                raise ValueError(f"{p}: size {preds[-1].shape[::-1]} differs from the ground truth's {gt.shape[:0:-1]}")
        pred = np.stack(preds)
        # the objects are the ids of the first annotated frame, as the official evaluator counts them (an id that
        # appears only later is not scored); the predicted ids are those of any frame
        try:
            if match and pred.max() > MAX_PROPOSALS:   # before split_ids makes a mask per id (a 0/255 PNG: 255)
                raise ValueError(f"predictions use id {pred.max()}: more than the {MAX_PROPOSALS} proposals the "
                                 f"protocol allows (a binary 0/255 mask is one object of id 255)")
            j, f = evaluate_objects(split_ids(gt, int(gt[0].max())), split_ids(pred), void, match=match)
        except ValueError as e:                      # too many ids: name the sequence
            raise ValueError(f"{Path(pred_dir) / seq}: {e}") from e
        for k in range(len(j)):
            jm, jr, jd = db_statistics(j[k])
            fm, fr, fd = db_statistics(f[k])
            for d, v in ((J, (jm, jr, jd)), (F, (fm, fr, fd))):
                d["M"].append(v[0]), d["R"].append(v[1]), d["D"].append(v[2])
            rows.append((f"{seq}_{k + 1}", jm, fm))
        if progress:
            eta = (time.time() - t0) / (s + 1) * (len(sequences) - s - 1)
            show_progress(f"{s + 1}/{len(sequences)} sequences, ETA {eta:.0f}s")
    if progress:
        end_progress()
    jm, fm = np.mean(J["M"]), np.mean(F["M"])
    g = {"J&F-Mean": (jm + fm) / 2, "J-Mean": jm, "J-Recall": np.mean(J["R"]), "J-Decay": np.mean(J["D"]),
         "F-Mean": fm, "F-Recall": np.mean(F["R"]), "F-Decay": np.mean(F["D"])}
    return g, rows


def write_tables(out_dir, g, rows, subset="val"):
    """global_results-<subset>.csv and per-sequence_results-<subset>.csv with the official columns, 3 decimals."""
    out_dir = Path(out_dir)
    with open(out_dir / f"global_results-{subset}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(list(g))
        w.writerow([f"{v:.3f}" for v in g.values()])
    with open(out_dir / f"per-sequence_results-{subset}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["Sequence", "J-Mean", "F-Mean"])
        w.writerows([(name, f"{jm:.3f}", f"{fm:.3f}") for name, jm, fm in rows])


def print_table(g, title=""):
    if title:
        print(title)
    print(" ".join(f"{k:>9}" for k in g))
    print(" ".join(f"{v:9.3f}" for v in g.values()))


def davis_sequences(root):
    """DAVIS 2017 val's ground truth: (the folder of <seq>/<frame>.png, the sequences of ImageSets/2017/val.txt), from
    the DAVIS tree (Annotations_unsupervised/480p) or from Ref-DAVIS17 in the converted layout, into which the
    conversion moved those PNGs (valid/Annotations; val.txt stays in DAVIS/, without it the videos of
    meta_expressions/valid). Every sequence's PNGs are looked for here, before any inference."""
    root = Path(root)
    lst = root / "ImageSets" / "2017" / "val.txt"
    if lst.is_file():                                                           # the DAVIS tree
        gt_dir, what = root / "Annotations_unsupervised" / "480p", "the DAVIS 2017 unsupervised annotations"
        hint = "; the Ref-DAVIS17 conversion moves them to valid/Annotations: give its root"
    elif (root / "meta_expressions").is_dir():                                  # converted Ref-DAVIS17
        gt_dir, what, hint = root / "valid" / "Annotations", "the converted Ref-DAVIS17 annotations", ""
        lst = root / "DAVIS" / "ImageSets" / "2017" / "val.txt"
    else:
        raise FileNotFoundError(f"{lst} not found: expected the DAVIS 2017 tree (ImageSets/2017/val.txt) or "
                                f"Ref-DAVIS17 converted (meta_expressions/, valid/Annotations)")
    if lst.is_file():
        seqs = [s.strip() for s in lst.read_text(encoding="utf-8").splitlines() if s.strip()]
    else:
        lst = root / "meta_expressions" / "valid" / "meta_expressions.json"
        seqs = sorted(data.read_expressions(lst, "the converted Ref-DAVIS17 expression file"))
    if not seqs:    # the means of no objects: a table of NaN
        raise ValueError(f"{lst}: no sequence listed; expected the DAVIS 2017 val sequences")
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"{gt_dir} not found: expected {what}")
    missing = [s for s in seqs if not data.listed(gt_dir / s, "*.png")]
    if missing:
        raise FileNotFoundError(f"{gt_dir / missing[0]}: no ground-truth PNGs ({len(missing)} of {len(seqs)} sequences "
                                f"lack them{hint})")
    return gt_dir, seqs


# ----------------------------------------------------------------------------------------------------------
# Pictures: mask overlays and optical flow in the colour-wheel coding of Fig. 2
# ----------------------------------------------------------------------------------------------------------

def color_wheel():
    """The Middlebury optical-flow colour wheel (Baker et al.): 55 hues, red-yellow-green-cyan-blue-magenta."""
    segments = [(15, (255, 0, 0), (255, 255, 0)), (6, (255, 255, 0), (0, 255, 0)), (4, (0, 255, 0), (0, 255, 255)),
                (11, (0, 255, 255), (0, 0, 255)), (13, (0, 0, 255), (255, 0, 255)), (6, (255, 0, 255), (255, 0, 0))]
    wheel = []
    for n, a, b in segments:
        for i in range(n):
            wheel.append([a[c] + (b[c] - a[c]) * i / n for c in range(3)])
    return np.array(wheel) / 255


def flow_to_color(flow, max_norm=None):
    """Float[2, H, W] (x, y) -> uint8 [H, W, 3]: hue = direction, saturation = length / max_norm (white = still)."""
    u, v = np.asarray(flow[0], np.float64), np.asarray(flow[1], np.float64)
    unknown = ~(np.isfinite(u) & np.isfinite(v))                    # Middlebury's flowToColor: NaN pixels black
    u, v = np.where(unknown, 0, u), np.where(unknown, 0, v)
    rad = np.hypot(u, v)
    max_norm = max_norm or max(rad.max(), 1e-6)
    u, v, rad = u / max_norm, v / max_norm, np.minimum(rad / max_norm, 1)
    wheel = color_wheel()
    n = len(wheel)
    a = np.arctan2(-v, -u) / np.pi                                  # [-1, 1]
    fk = (a + 1) / 2 * (n - 1)
    k0 = np.floor(fk).astype(int)
    k1 = (k0 + 1) % n
    f = (fk - k0)[..., None]
    col = (1 - f) * wheel[k0] + f * wheel[k1]
    col = 1 - rad[..., None] * (1 - col)
    col[unknown] = 0
    return (col * 255).round().astype(np.uint8)


def overlay(frame, mask, color=(255, 40, 40), alpha=0.5):
    """uint8 [H, W, 3] frame with the mask tinted and its boundary drawn."""
    frame, mask = np.asarray(frame), np.asarray(mask)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame {frame.shape} {frame.dtype}: expected uint8 [H, W, 3] (to_uint8 converts [0, 1] "
                         f"frames)")
    if mask.shape != frame.shape[:2]:
        raise ValueError(f"mask {mask.shape} and frame {frame.shape[:2]} differ in size")
    if mask.dtype.kind == "f":   # probabilities or logits: every non-zero pixel would be tinted, as in the metrics
        raise ValueError(f"mask is {mask.dtype}; expected a binary mask (e.g. logits > 0)")
    mask = mask.astype(bool)                                        # not an index array (uint8 0/1 picks rows 0, 1)
    out = frame.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    out[seg2bmap(mask)] = color
    return out.clip(0, 255).astype(np.uint8)


def to_uint8(frames):
    """Float[..., 3, H, W] in [0, 1] -> uint8 [..., H, W, 3]."""
    return (frames.clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# Inference: clips of T frames over every frame, masks at the original size, no post-processing (Sec. 4.1)
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, dataset, tokenizer, batch_size=4, device="cpu", progress=True, workers=0):
    """Runs the model over an evaluation dataset (clips covering every frame; an expression's clips come one after
    another, and a video's expressions too). Yields ((video, exp_id), {frame name: Float[H0, W0] numpy}) as each
    expression is done: the mask logits resized (bilinear) back to the original frame size; the mask is logits > 0.
    One expression at a time, so the full-size masks of a whole benchmark are never held together. `workers` read the
    clips in worker processes, in the same order."""
    if getattr(model, "task", "rvos") != "rvos":
        raise ValueError("predict needs a transfer (rvos) model; this one is a pre-training model (flow only): "
                         "load_checkpoint(path, task='rvos') and fine-tune it")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=data.Collate(tokenizer, model.cfg.max_text_len))
    model.eval()
    key, per, done_keys, t0, done = None, {}, set(), time.time(), 0
    for batch in data.read_batches(loader):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
            logits = model(batch["frames"].to(device), batch["ids"].to(device), batch["mask"].to(device))["masks"]
        for b in range(len(logits)):
            vid, exp_id, _ = batch["id"][b]
            if (vid, exp_id) != key:
                if key is not None:
                    yield key, per
                assert (vid, exp_id) not in done_keys, f"the clips of {vid} {exp_id} are not one after another"
                key, per = (vid, exp_id), {}
                done_keys.add(key)
            H0, W0 = batch["orig_size"][b]
            n = batch["num_real"][b]
            up = F.interpolate(logits[b, :n, None].float(), size=(H0, W0), mode="bilinear", align_corners=False)
            for name, m in zip(batch["frame_names"][b][:n], up[:, 0].cpu().numpy()):
                per[name] = m
        done += len(logits)
        if progress:
            eta = (time.time() - t0) / done * (len(dataset) - done)
            show_progress(f"{done}/{len(dataset)} clips, ETA {eta:.0f}s")
    if progress:
        end_progress()
    if key is not None:
        yield key, per


def by_video(preds):
    """predict's expressions grouped by video: yields (video, {exp_id: {frame name: logits}})."""
    seen = set()
    for vid, group in itertools.groupby(preds, key=lambda kv: kv[0][0]):
        assert vid not in seen, f"the expressions of {vid} are not one after another"
        seen.add(vid)
        yield vid, {exp_id: frames for (_, exp_id), frames in group}


def write_indexed(path, ids):
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette = [0, 0, 0] + [c for k in range(1, 256) for c in ((k * 97) % 256, (k * 59) % 256, (k * 163) % 256)]
    im.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def merge_objects(logits):
    """One frame's objects {id: Float[H, W] logits} -> Uint8[H, W] ids: each pixel goes to the object of the highest
    float32 probability among those whose mask covers it (probability >= 0.5), 0 where none does; ties to the lower
    id (the sigmoid saturates: two logits above ~17 both give 1.0). This is how ReferFormer's Ref-DAVIS17 inference
    composes its objects, behind the published numbers."""
    ids = sorted(logits)
    prob = torch.from_numpy(np.stack([logits[i] for i in ids]).astype(np.float32)).sigmoid().numpy()   # [K, H, W]
    return np.where(prob.max(0) >= 0.5, np.asarray(ids, np.uint8)[prob.argmax(0)], 0).astype(np.uint8)


def write_object_pngs(vid, exps, out_dir, obj_of):
    """A video's expressions {exp_id: {frame name: logits}} as one indexed PNG per frame, each expression's mask
    under its object id obj_of(exp_id), overlaps resolved by merge_objects."""
    for name in next(iter(exps.values())):
        ids = merge_objects({obj_of(e): frames[name] for e, frames in exps.items()})
        write_indexed(Path(out_dir) / vid / f"{name}.png", ids)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------

def synthetic_scores(model, tokenizer, n=64, batch_size=8, device="cpu", seed=0, sheet=None, workers=0):
    """The embedded benchmark: a fixed held-out set of synthetic R-VOS clips; J, F, J&F means over clips. With `sheet`,
    a picture of the first 4 clips there, each as two rows: the predicted mask outlined above the true one
    (data.contact_sheet's drawing)."""
    ds = data.build_dataset("synthetic", None, "val", model.cfg, train=False, size=n, seed=seed)
    preds = dict(predict(model, ds, tokenizer, batch_size, device, progress=False, workers=workers))
    js, fs, rows = [], [], []
    for i in range(len(ds)):
        it = ds[i]
        vid, exp_id, start = it["id"]
        pred = np.stack([preds[(vid, exp_id)][name] > 0 for name in it["frame_names"]])
        gt = it["masks"].numpy()
        j, f = evaluate_objects(gt[None], pred[None], match=False)
        js.append(j.mean()), fs.append(f.mean())
        if sheet is not None and i < 4:
            rows += [{**it, "masks": torch.from_numpy(pred), "id": (f"{vid}, predicted", exp_id, start)},
                     {**it, "id": (f"{vid}, true", exp_id, start)}]
    if rows:
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        data.contact_sheet(rows).save(sheet)
    J, Fm = float(np.mean(js)), float(np.mean(fs))
    return {"J": J, "F": Fm, "J&F": (J + Fm) / 2}


def bench_davis17(args, model, tokenizer, device):
    """Ref-DAVIS17: four runs (annotator 1/2 x first-frame/full-video), each written as indexed PNGs and scored
    with the DAVIS 2017 unsupervised protocol, then averaged."""
    gt_dir, seqs = davis_sequences(args.davis_root)
    results = []
    for a, run in enumerate(data.RefDAVIS17.RUNS):
        ds = data.build_dataset("davis17", args.data_root, "valid", model.cfg, train=False, annotation=a)
        print(f"run {a}: {run}, {len(ds)} clips")
        out, predicted = Path(args.out) / f"run{a}", set()
        for vid, exps in by_video(predict(model, ds, tokenizer, args.batch_size, device, workers=args.workers)):
            write_object_pngs(vid, exps, out, lambda exp_id: int(exp_id) // 4 + 1)
            predicted.add(vid)
        scored = [s for s in seqs if s in predicted]              # this run's, not a folder left from another
        if not scored:  # a partial tree (a conversion of one annotator's files): the mean is of the runs it has
            print(f"run {a}: not scored, no expression in any sequence")
            continue
        if len(scored) < len(seqs):
            print(f"run {a}: not scored, no expression: {', '.join(s for s in seqs if s not in scored)}")
        g, rows = evaluate_davis(gt_dir, scored, out)
        write_tables(out, g, rows)
        print_table(g, f"run {a} ({run})")
        results.append(g)
    if not results:
        raise ValueError(f"{args.data_root}: no expression of a sequence of {gt_dir} in any run; nothing to score")
    mean = {k: float(np.mean([g[k] for g in results])) for k in results[0]}
    print_table(mean, "Ref-DAVIS17, mean of the four runs" if len(results) == 4 else
                f"Ref-DAVIS17, mean of the {len(results)} runs scored, not the benchmark's four")
    return mean


def bench_ytvos(args, model, tokenizer, device):
    """Ref-YouTube-VOS valid: Annotations/<vid>/<exp_id>/<frame>.png (0/255, original size), zipped."""
    ds = data.build_dataset("ytvos", args.data_root, "valid", model.cfg, train=False)
    if not len(ds):  # an empty zip would look like a submission
        raise ValueError(f"{args.data_root}: no valid video with an expression (meta_expressions/valid less "
                         f"meta_expressions/test); nothing to predict")
    out = Path(args.out)
    zpath = out / "submission.zip"
    out.mkdir(parents=True, exist_ok=True)
    vids, n = set(), 0
    partial = zpath.with_name(zpath.name + ".part")   # renamed when whole: a failed run leaves no zip to upload,
    zpath.unlink(missing_ok=True)                     # not even an earlier run's
    try:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
            for (vid, exp_id), frames in predict(model, ds, tokenizer, args.batch_size, device, workers=args.workers):
                for name, m in frames.items():
                    path = out / "Annotations" / vid / exp_id / f"{name}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray((m > 0).astype(np.uint8) * 255, mode="L").save(path)
                    z.write(path, f"Annotations/{vid}/{exp_id}/{name}.png")
                vids.add(vid)
                n += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, zpath)
    print(f"wrote {zpath} ({n} expressions of {len(vids)} videos)")
    return zpath


def bench_visor(args, model, tokenizer, device):
    """VISOR val: each object's name is its expression; masks are scored against the object's own ground truth
    (ids known, no matching), on every annotated frame. The objects scored are those the DAVIS evaluator counts,
    ids 1 up to the largest id of the sequence's first annotated frame: an object of the mapping whose id is above it
    (missing there: too small at 480p, or covered) is predicted, not scored, and left out of the written PNGs, where it
    would cover others."""
    ds = data.build_dataset("visor", args.data_root, "val", model.cfg, train=False)
    gt_dir = Path(args.data_root) / "Annotations" / "480p"
    out, seqs, left_out = Path(args.out) / "visor", [], []
    for seq, exps in by_video(predict(model, ds, tokenizer, args.batch_size, device, workers=args.workers)):
        counted = first_frame_objects(gt_dir, seq)
        left_out += [(seq, o) for o in exps if int(o) > counted]
        exps = {o: frames for o, frames in exps.items() if int(o) <= counted}
        if exps:
            write_object_pngs(seq, exps, out, int)
            seqs.append(seq)
    if left_out:
        left_out.sort(key=lambda k: (k[0], int(k[1])))
        print(f"not scored, ids above their sequence's first annotated frame's: {len(left_out)} objects ("
              + ", ".join(f"{v} {o}" for v, o in left_out[:5]) + (", ..." if len(left_out) > 5 else "") + ")")
    if not seqs:
        raise ValueError(f"{gt_dir}: no object of the mapping file is in its sequence's first annotated frame; nothing "
                         f"to score")
    seqs.sort()
    g, rows = evaluate_davis(gt_dir, seqs, out, match=False)
    write_tables(out, g, rows)
    print_table(g, "VISOR val")
    return g


GIF_SIDE = 480   # demo.gif's frames at most this many pixels on their long side (the PNGs keep the full size)


def demo_frames(video):
    """The demo's frames, read one at a time as (name, RGB image as players show it), their number (None where the
    container does not say) and demo.gif's frame duration in ms. A folder's .jpg/.png frames in data.frame_order,
    turned as their EXIF orientation says (a phone's photos), hidden files (macOS's ._ copies) left out, 100 ms a
    frame; or a video file's (any PyAV decodes) at its rate, turned as its display matrix says (a phone's portrait
    video stores landscape pixels and -90 degrees: PyAV's frame.rotation, counterclockwise)."""
    video = Path(video)
    if video.is_dir():
        paths = sorted((video / n for n in data.listed(video, "*")
                        if Path(n).suffix.lower() in (".jpg", ".jpeg", ".png")), key=data.frame_order)
        if not paths:
            raise FileNotFoundError(f"{video}: no .jpg/.png frames")
        return ((p, ImageOps.exif_transpose(data.read_image(p))) for p in paths), len(paths), 100
    if not video.is_file():
        raise FileNotFoundError(f"{video}: no such video file or folder")
    expected = "expected a video file or a folder of frames"
    av, c = data.open_video(video, expected)
    stream = c.streams.video[0]

    def decode():
        n = 0
        with c:
            for n, f in enumerate(data.decode_video(av, c, video, expected), 1):
                yield f"{video} frame {n - 1}", data.upright(f)
        if n == 0:
            raise ValueError(f"{video}: no frames decoded; {expected}")
    rate = stream.average_rate
    return decode(), stream.frames or None, max(20, round(1000 / rate)) if rate else 100


def demo(args, model, tokenizer, device):
    """Overlays of the predicted mask on every frame of a video (a folder of frames or a video file), and a GIF. The
    frames are read, run in clips of T (data.eval_clips: the last padded by repeating its last frame) and written
    a clip at a time: a long video is never held whole; demo.gif's frames are at most GIF_SIDE pixels wide or high."""
    cfg = model.cfg
    out, video = Path(args.out) / "demo", Path(args.video).resolve()
    if out.resolve() in (video, video.parent):
        raise ValueError(f"--video {args.video} is in the demo's folder, {out}, whose earlier overlays it deletes: "
                         f"choose another --out")
    frames, count, ms = demo_frames(args.video)
    ids, mask = tokenizer([args.text], max_len=cfg.max_text_len)
    pieces = tokenizer.sp.encode(args.text)
    if len(pieces) >= cfg.max_text_len:    # as training cut its texts, silently
        data.note(f"--text is {len(pieces)} pieces; the model reads its first {cfg.max_text_len - 1} and </s>")
    if unknown := pieces.count(tokenizer.sp.unk_id()):
        data.note(f"--text: {unknown} of its {len(pieces)} pieces are unknown to {tokenizer.path} (<unk>): words or "
                  f"letters its training texts did not have")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*(p for p in out.glob("*.png") if p.stem.isdigit()), out / "demo.gif"]:   # an earlier demo's: a
        old.unlink(missing_ok=True)                                                        # longer video's would stay
    gif, size, t0 = [], None, time.time()
    with torch.no_grad():
        for clip in iter(lambda: list(itertools.islice(frames, cfg.num_frames)), []):   # the last may be shorter
            size = size or clip[0][1].size
            for name, im in clip:
                if im.size != size:
                    raise ValueError(f"{name}: {im.width}x{im.height}, the first frame {size[0]}x{size[1]}; a "
                                     f"video's frames are all one size")
            small = torch.stack([torch.from_numpy(np.array(im.resize(cfg.frame_size[::-1], Image.BILINEAR)))
                                 .permute(2, 0, 1).float() / 255 for _, im in clip])
            (_, idx, _), = data.eval_clips(len(clip), cfg.num_frames)      # one clip: the last frame repeated
            logits = model(small[idx][None].to(device), ids.to(device), mask.to(device))["masks"][0, :len(clip)]
            up = F.interpolate(logits[:, None].float(), size=size[::-1], mode="bilinear", align_corners=False)[:, 0]
            for (_, im), m in zip(clip, (up > 0).cpu().numpy()):
                pic = Image.fromarray(overlay(np.asarray(im), m))
                pic.save(out / f"{len(gif):05d}.png")
                pic.thumbnail((GIF_SIDE, GIF_SIDE))                       # in place, the aspect kept
                gif.append(pic.convert("P", palette=Image.Palette.ADAPTIVE))   # as the GIF writer would
            eta = f", ETA {(time.time() - t0) / len(gif) * (count - len(gif)):.0f}s" if (count or 0) > len(gif) else ""
            show_progress(f"{len(gif)}{f'/{count}' if count else ''} frames{eta}")
    end_progress()
    gif[0].save(out / "demo.gif", save_all=True, append_images=gif[1:], duration=ms, loop=0)
    print(f"wrote {len(gif)} overlays and {out / 'demo.gif'}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def load_model_and_tokenizer(ckpt, spm, device):
    import slvp
    model = slvp.load_checkpoint(ckpt).to(device)
    if model.task != "rvos":
        raise ValueError(f"{ckpt} is a pre-training checkpoint; evaluation needs a fine-tuned (rvos) one")
    spm = Path(spm) if spm else Path(ckpt).parent / "spm.model"
    if not spm.is_file():
        raise FileNotFoundError(f"{spm}: no tokenizer (pass --spm, or keep spm.model next to the checkpoint)")
    tokenizer = slvp.Tokenizer(spm)
    if len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(f"{spm} has {len(tokenizer)} pieces, more than the {model.cfg.vocab_size} of {ckpt}; expected "
                         f"the sentencepiece model the checkpoint was trained with")
    slvp.check_tokenizer(ckpt, tokenizer)
    return model, tokenizer


def main(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=["davis17", "ytvos", "visor", "synthetic"],
                   help="the benchmark to run; leave out with --video for the demo")
    p.add_argument("--ckpt", type=data.path, help="a fine-tuned (rvos) checkpoint from train.py --mode finetune")
    p.add_argument("--spm", type=data.path, help="sentencepiece model (default: spm.model next to the checkpoint)")
    p.add_argument("--predictions", type=data.path,
                   help="davis17 only: score this folder of indexed PNGs (<seq>/<frame>.png), no model")
    p.add_argument("--davis-root", type=data.path,
                   help="the ground truth: the DAVIS 2017 tree (ImageSets/2017/val.txt, Annotations_unsupervised/480p) "
                        "or converted Ref-DAVIS17 (valid/Annotations); default: in --data-root")
    p.add_argument("--data-root", type=data.path,
                   help="the dataset root: Ref-DAVIS17 (the original downloads or the converted layout), "
                        "Ref-YouTube-VOS or VISOR")
    p.add_argument("--video", type=data.path,
                   help="demo: a folder of JPEG/PNG frames or a video file (.mp4, .mov, .webm, ...)")
    p.add_argument("--text", help="demo: the referring expression")
    p.add_argument("--out", default=None, type=data.path,
                   help="where predictions, tables and pictures go (default: out/eval; not with --predictions, whose "
                        "two CSV tables go into the predictions folder, as the official tool writes them)")
    p.add_argument("--batch-size", type=data.number(int, 1), default=None,
                   help="a benchmark's clips per forward pass (default: 4)")
    p.add_argument("--workers", type=data.number(int, 0), default=None,
                   help="DataLoader worker processes reading a benchmark's clips (default: 0 on the CPU; with a GPU the "
                        "process's share of the cores less one, 1 to 16)")
    p.add_argument("--num-clips", type=data.number(int, 1), default=None,
                   help="synthetic: the number of held-out clips (default: 256; 64 are few for differences of "
                        "a few hundredths, README 'At 64x96')")
    args = p.parse_args(argv)
    PROGRESS_LINE[0] = False
    if args.predictions and args.bench != "davis17":
        p.error("--predictions scores a folder of DAVIS-style masks: it goes with --bench davis17")
    if args.predictions and args.ckpt:
        p.error("--predictions scores a folder of masks and --ckpt runs a model: give one of them")
    if args.predictions and args.out:
        p.error("--out: with --predictions the tables go into the predictions folder, as the official tool writes "
                "them; leave out --out")
    args.out = args.out or "out/eval"
    if (args.video or args.text is not None) and args.bench:
        p.error(f"--video and --text are for the demo: leave out --bench {args.bench}, or them")
    if args.text is not None and not args.text.strip():
        p.error("--text is empty: expected the referring expression")
    root = "--data-root" if args.data_root else "--davis-root" if args.davis_root else None
    if args.bench is None and root:
        p.error(f"{root} goes with --bench " + ("davis17, ytvos or visor" if root == "--data-root" else "davis17")
                + " (the demo reads --video)")
    if args.bench == "synthetic" and root:
        p.error(f"{root}: --bench synthetic is made here and reads no dataset; leave it out")
    if args.bench in ("ytvos", "visor") and args.davis_root:
        p.error(f"--davis-root is the DAVIS 2017 ground truth of --bench davis17; --bench {args.bench} reads its own "
                f"under --data-root: leave it out")
    # flags that would do nothing, after the checks that name a contradiction or a missing --bench
    if args.num_clips is not None and args.bench != "synthetic":
        p.error("--num-clips is the number of held-out synthetic clips: it goes with --bench synthetic")
    for flag, value in (("--spm", args.spm), ("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value is not None and args.predictions:
            p.error(f"{flag} is for a model run; --predictions scores masks without one: leave it out")
        if value is not None and flag != "--spm" and not args.bench:
            p.error(f"{flag} goes with a --bench (the demo runs its video one clip at a time): leave it out")
    args.batch_size, args.num_clips = args.batch_size or 4, args.num_clips or 256
    args.workers = data.default_workers(torch.cuda.is_available()) if args.workers is None else args.workers
    if not args.predictions and (problem := data.cannot_write(args.out)):
        p.error(f"--out {args.out}: {problem}")
    try:
        if args.bench == "davis17" and args.data_root and not args.davis_root:   # the ground truth is inside
            original = data.davis17_layout(args.data_root) == "original"
            args.davis_root = str(Path(args.data_root) / "DAVIS") if original else args.data_root
        if args.bench == "davis17" and args.predictions:
            if not args.davis_root:
                p.error("--predictions needs --davis-root (or Ref-DAVIS17 as --data-root)")
            gt_dir, seqs = davis_sequences(args.davis_root)
            if not Path(args.predictions).is_dir():
                raise FileNotFoundError(f"{args.predictions}: " + ("a file; expected a" if Path(args.predictions).exists()
                                                                   else "no such") + " predictions folder")
            if problem := data.cannot_write(args.predictions):       # the tables go there, after the scoring
                raise ValueError(f"--predictions {problem}; the tables go into the "
                                 f"predictions folder, as the official tool writes them: score a copy")
            g, rows = evaluate_davis(gt_dir, seqs, args.predictions)
            write_tables(args.predictions, g, rows)
            print_table(g)
            return g
        if not args.ckpt:
            p.error("a model run needs --ckpt (or --bench davis17 --predictions DIR to score existing masks)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model_and_tokenizer(args.ckpt, args.spm, device)
        if args.bench is None:
            if not (args.video and args.text):
                p.error("the demo needs --video and --text (or choose a --bench)")
            return demo(args, model, tokenizer, device)
        if args.bench == "synthetic":
            sheet = Path(args.out) / "synthetic.png"
            s = synthetic_scores(model, tokenizer, n=args.num_clips, batch_size=args.batch_size, device=device,
                                 sheet=sheet, workers=args.workers)
            print(f"synthetic ({args.num_clips} held-out clips): J {s['J']:.3f}  F {s['F']:.3f}  J&F {s['J&F']:.3f}")
            print(f"wrote {sheet}")
            return s
        if not args.data_root:
            p.error(f"--bench {args.bench} needs --data-root")
        return {"davis17": bench_davis17, "ytvos": bench_ytvos, "visor": bench_visor}[args.bench](args, model, tokenizer, device)
    except (FileNotFoundError, ValueError) as e:
        if PROGRESS_LINE[0]:                        # the error on a line of its own, not after "3/8 clips, ETA 2s"
            end_progress()
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    data.run_main(main)
