"""
Datasets for SLVP. One entry point:

    build_dataset(name, root, split, cfg, train, **options) -> torch Dataset

name: synthetic (the embedded default, no download), smit (pre-training), ytvos, davis17, refcoco, visor.
Items are dicts: frames Float[T,3,H,W] in [0,1] at cfg.frame_size, text str, id (video, expression id, clip
start); for R-VOS masks Bool[T,H,W], boxes Float[T,4] normalized (x1, y1, x2, y2), valid Bool[T]; synthetic
clips not augmented also carry the true flow Float[T,2,H,W] (frame i into frame 1, zero for frame 1) and the
owner map Long[T,H,W] (0 background, k the k-th object drawn). R-VOS
evaluation datasets (train=False) also give orig_size (H, W) and the T frame_names, and cover every frame of every
video with clips of T frames, the last one padded by repeating its last frame (num_real says how many are real).

All randomness (clip sampling, augmentation, synthetic scenes) is drawn from a generator seeded by
(seed, epoch, index): items do not depend on the worker that loads them, so any number of DataLoader workers,
a DistributedSampler, or a resumed run give the same clips. Call set_epoch(epoch) for fresh augmentations
(DataLoader workers that persist keep their own copies of the set: train.EpochItems passes the epoch in the index).

Run as a script it is the dataset inspector, the first thing to run on a new download: it prints the layout it
found, the counts (videos or images, frames, expressions, objects) and what it skipped and why, and writes a
contact sheet of a few clips (frames, the target outlined, the expression above):

    python data.py NAME --data-root ROOT [--split S] [--out SHEET.png]
    python data.py                                      # the synthetic world, no root

It also holds what the three command lines (data.py, train.py, eval.py) share: a bad flag or file ends them with
one line, `error: ...`, and no traceback.
"""
import argparse
import fnmatch
import json
import math
import os
import pickle
import re
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# ----------------------------------------------------------------------------------------------------------
# Command lines: flags checked as they are parsed; every error is one line
# ----------------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its errors printed as one line `error: ...` (without the usage block above it), like the
    errors of files that main() prints; exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def run_main(main):
    """A script's entry: its output piped into a reader that stops early (`python data.py | head -3`) ends it quietly,
    as it ends `cat`, not with Python's BrokenPipeError traceback."""
    try:
        main()
        sys.stdout.flush()   # here, not at the interpreter's exit, where the error could only be reported
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's recipe: no second error at exit,
        raise SystemExit(1)                                              # when the interpreter flushes stdout)


def number(kind, low, strict=False, high=None):
    """An argparse type: a finite int or float (kind) >= low, or > low when strict, and <= high where given."""
    what = f"{'an integer' if kind is int else 'a finite number'} {'>' if strict else '>='} {low}"
    what += f" and <= {high:g}" if isinstance(high, float) else f" and <= {high}" if high is not None else ""

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = None
        if (x is None or not math.isfinite(x) or x < low or (strict and x == low)
                or (high is not None and x > high)):
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {what}")
        return x
    return parse


def path(text):
    """An argparse type for a file or folder: not empty (a quoted shell variable left unset gives '', which taken as
    "not given" started a fine-tuning from random weights, or as "." read and wrote the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a path")
    return text


# ----------------------------------------------------------------------------------------------------------
# Reading files; every failure names the file
# ----------------------------------------------------------------------------------------------------------

class BadFile(ValueError):
    """A file that cannot be read as what it should be; the message names it and what was expected. A ValueError, so
    skip_bad and the command lines' main() catch it with the others; train.py's loop catches this one alone, where a
    clip's files are read, so that a bug's ValueError there keeps its traceback."""


def frame_order(path):
    """Sort key of a frame file: by the numbers in its name, so that frames named without zero padding (ffmpeg's
    %d: 1.jpg, 2.jpg, ..., 10.jpg) keep their order; zero-padded names sort as their text does. re.split with a group
    alternates text and digits, so a number is only ever compared with a number; the name breaks ties (1 and 01)."""
    name = os.path.basename(path)
    return [int(t) if k % 2 else t for k, t in enumerate(re.split(r"([0-9]+)", name))], name


def read_image(path):
    """An image file as a PIL RGB image; a missing, truncated or non-image file fails naming it."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):   # a 16-bit grey PNG (I;16; I in older Pillow): convert("RGB") clips at 255
                grey = np.asarray(im).astype(np.float64) / 257                  # 65535 -> 255
                return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise BadFile(f"{path}: unreadable image ({e}); expected a JPEG or PNG frame") from e


def read_rgb(path, size):
    """A frame as Float[3, H, W] in [0, 1] resized (bilinear) to size = (H, W), and its original (H, W)."""
    im = read_image(path)
    orig = (im.height, im.width)
    im = im.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255, orig


def read_index_png(path):
    """An indexed (palette) annotation PNG as uint8 [H, W]: pixel value = object id, 0 background."""
    if not Path(path).is_file():
        raise BadFile(f"{path}: missing annotation")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"mode {im.mode}, expected an indexed (P) or grey (L) PNG")
            return np.asarray(im).copy()
    except (OSError, ValueError) as e:
        raise BadFile(f"{path}: unreadable annotation ({e})") from e


def resize_mask(mask, size):
    """Bool [h, w] (numpy) -> Bool[H, W] tensor, nearest neighbour."""
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.asarray(im) > 127)


def boxes_from_masks(masks):
    """Bool[T, H, W] -> boxes Float[T, 4] normalized (x1, y1, x2, y2) of the mask's pixels (x2, y2 exclusive),
    zeros where empty, and valid Bool[T] = the object is visible."""
    T, H, W = masks.shape
    rows, cols = masks.any(2), masks.any(1)                             # [T, H], [T, W]
    valid = rows.any(1)
    first = lambda m: m.byte().argmax(1)                                # index of the first True (0 if none)
    x1, y1 = first(cols), first(rows)
    x2, y2 = W - first(cols.flip(1)), H - first(rows.flip(1))           # one past the last True
    boxes = torch.stack([x1 / W, y1 / H, x2 / W, y2 / H], 1)
    return torch.where(valid[:, None], boxes, 0.0), valid


def need(path, what):
    """Fail fast with one line naming the missing path and what was expected there."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found: expected {what}")
    return Path(path)


def cannot_write(folder):
    """Why an output folder cannot be made or written into, or None: the first of `folder` and the folders above it
    that exists is a file, or a folder this process cannot write into (a read-only file system, permissions). Asked
    before the work, not met at its first file after it (a traceback)."""
    near = next((d for d in (Path(folder), *Path(folder).parents) if d.exists()), None)
    if near is not None and not near.is_dir():
        return f"{near} is a file; expected a folder"
    if near is not None and not os.access(near, os.W_OK | os.X_OK):
        return f"{near} is not writable (a read-only file system or no permission)"
    return None


def read_json(path, what):
    """A JSON file; missing or not JSON, it fails with one line naming the path and what was expected there."""
    try:
        return json.loads(need(path, what).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(f"{path}: not JSON ({e}); expected {what}") from e


def read_expressions(path, what, obj_ids=False):
    """The videos of a meta_expressions.json ({"videos": {vid: {"expressions": {exp_id: {"exp": text, "obj_id":
    id}}, "frames": [...]}}}); with obj_ids (a split with annotations) each expression names its object. A file of
    another shape fails naming it."""
    meta = read_json(path, what)
    try:
        for v in meta["videos"].values():
            for e in v["expressions"].values():
                e["exp"], int(e["obj_id"] if obj_ids else e.get("obj_id", 0))   # there, the object id a number
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BadFile(f"{path}: {type(e).__name__} {e}; expected {what}: {{\"videos\": {{video: {{\"expressions\": "
                         f"{{id: {{\"exp\": text, \"obj_id\": id}}}}}}}}}}") from e
    return meta["videos"]


def clean_text(text):
    return " ".join(str(text).replace("\n", " ").split())


def some(names, k=3):
    """The first k of a list of skipped things, for a note that names them."""
    return ", ".join(map(str, names[:k])) + (", ..." if len(names) > k else "")


class Note(UserWarning):
    """What a loader skipped (empty expressions, bad clips): printed as one line, `note: ...`, not as a warning
    followed by the line of data.py that raised it."""


def note(message):
    warnings.warn(message, Note, stacklevel=2)


def format_note(message, category, *args, _format=warnings.formatwarning, **kwargs):
    return f"note: {message}\n" if issubclass(category, Note) else _format(message, category, *args, **kwargs)


# (a replaced formatwarning is passed no source: -X tracemalloc's "Object allocated at" is then not shown)
warnings.formatwarning = format_note


# ----------------------------------------------------------------------------------------------------------
# Transfer-learning augmentations (Sec. 4.1): the whole clip flipped, cropped and colour-jittered consistently
# ----------------------------------------------------------------------------------------------------------

_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def swap_left_right(text):
    """Whole words only: 'left' <-> 'right' and 'leftmost' <-> 'rightmost' keeping case; 'bright' and 'leftover'
    stay."""
    def swap(m):
        w, most = m.group(1), m.group(2) or ""
        new = "right" if w.lower() == "left" else "left"
        new = new.upper() if w.isupper() else new.capitalize() if w[0].isupper() else new
        return new + most
    return _LEFT_RIGHT.sub(swap, text)


def augment(item, rng, crop_scale=(0.6, 1.0), jitter=0.2):
    """Random horizontal flip (with the words), random crop that keeps the target when it can (then resized back),
    colour jitter (brightness, contrast, saturation). Boxes and valid flags are recomputed from the masks. The true
    flow, if any, is dropped: it is a pre-training signal and augmented clips are for transfer learning."""
    frames, masks, text = item["frames"], item["masks"], item["text"]
    T, _, H, W = frames.shape
    if rng.random() < 0.5:
        frames, masks, text = frames.flip(-1), masks.flip(-1), swap_left_right(text)
    s = rng.uniform(*crop_scale)
    ch, cw = max(1, round(H * s)), max(1, round(W * s))
    y0, x0 = _crop_origin(masks.any(0), ch, cw, rng)
    # Frames and masks are resampled alike (bilinear, align_corners=False: output pixel i samples the crop at
    # (i + 0.5) * ch / H - 0.5), the masks then thresholded at 0.5: a pixel is in the mask when the mask's bilinear
    # interpolant exceeds 0.5 at its sample point. mode="nearest" would sample floor(i * ch / H), half a source
    # pixel off the frames.
    frames = F.interpolate(frames[:, :, y0:y0 + ch, x0:x0 + cw], size=(H, W), mode="bilinear", align_corners=False)
    masks = F.interpolate(masks[:, None, y0:y0 + ch, x0:x0 + cw].float(), size=(H, W), mode="bilinear",
                          align_corners=False)[:, 0] > 0.5
    b, c, sat = (rng.uniform(1 - jitter, 1 + jitter) for _ in range(3))
    grey = frames.mean(1, keepdim=True)
    frames = grey + sat * (frames - grey)                                   # saturation
    frames = frames.mean((1, 2, 3), keepdim=True) + c * (frames - frames.mean((1, 2, 3), keepdim=True))  # contrast
    frames = (b * frames).clamp(0, 1)                                       # brightness
    boxes, valid = boxes_from_masks(masks)
    out = {k: v for k, v in item.items() if k not in ("flow", "owner")}    # maps of the frames before augmentation
    out.update(frames=frames.contiguous(), masks=masks, boxes=boxes, valid=valid, text=text)
    return out


def _crop_origin(union, ch, cw, rng):
    """Top-left corner of a ch x cw crop: one that contains the target's box over the whole clip if it fits."""
    H, W = union.shape
    ys, xs = torch.nonzero(union.any(1)).flatten(), torch.nonzero(union.any(0)).flatten()
    if len(ys) and ys[-1] - ys[0] < ch and xs[-1] - xs[0] < cw:
        y_lo, y_hi = max(0, int(ys[-1]) - ch + 1), min(int(ys[0]), H - ch)
        x_lo, x_hi = max(0, int(xs[-1]) - cw + 1), min(int(xs[0]), W - cw)
    else:
        y_lo, y_hi, x_lo, x_hi = 0, H - ch, 0, W - cw
    return int(rng.integers(y_lo, y_hi + 1)), int(rng.integers(x_lo, x_hi + 1))


# ----------------------------------------------------------------------------------------------------------
# Base class: seeded items, skip_bad, augmentation
# ----------------------------------------------------------------------------------------------------------

class ClipDataset(torch.utils.data.Dataset):
    """Subclasses fill self.items, self.layout (what was read, from where) and self.summary (counts: videos or
    images, frames, expressions, objects), and define load(entry, rng) -> item dict and text_of(entry) -> str (what
    texts() reads)."""

    rvos = True  # items carry masks/boxes/valid; augmented when train

    def __init__(self, cfg, train, seed=0, skip_bad=False):
        self.cfg, self.train, self.seed, self.skip_bad = cfg, train, seed, skip_bad
        self.epoch, self.bad = 0, 0
        self.items, self.layout, self.summary = [], "", {}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def texts(self, n):
        """Up to n of the dataset's captions or expressions (to fit a tokenizer), one every len/n clips over the
        whole list, so that a list in order of class, or RefCOCO's three datasets one after another, is covered to
        its end; without loading any frame."""
        step = max(len(self.items) / n, 1)
        return [self.text_of(self.items[int(i * step)]) for i in range(min(n, len(self.items)))]

    def __len__(self):
        return len(self.items)

    def rng(self, index):
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index):
        if not 0 <= index < len(self):  # also ends a plain `for item in dataset`
            raise IndexError(f"index {index} of a dataset of {len(self)} clips")
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            rng = self.rng(i)  # clip sampling, then augmentation, draw from this one stream
            try:
                item = self.load(self.items[i], rng)
                break
            except ValueError as e:
                if not self.skip_bad:
                    raise
                self.bad += 1
                note(f"skipped a bad clip ({self.bad} so far in this process): {e}")
                last = e
        else:
            raise BadFile(f"each of the {len(self)} clips of the dataset is bad as drawn this epoch, the last: {last}")
        if self.train and self.rvos:
            item = augment(item, rng)
        return item


def clip_indices(n, T, rng):
    """Training: T consecutive frame indices at a random start (clamped to the video when it is shorter)."""
    start = int(rng.integers(0, max(n - T, 0) + 1))
    return [min(start + j, n - 1) for j in range(T)]


def eval_clips(n, T):
    """Evaluation: consecutive clips of T frames covering all n; the last padded by repeating its last frame."""
    return [(s, [min(s + j, n - 1) for j in range(T)], min(T, n - s)) for s in range(0, n, T)]


# ----------------------------------------------------------------------------------------------------------
# Synthetic world: textured shapes moving over a textured, optionally panning, background
# ----------------------------------------------------------------------------------------------------------

COLORS = {"red": (0.90, 0.12, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.12, 0.30, 0.95),
          "yellow": (0.95, 0.85, 0.10), "purple": (0.60, 0.20, 0.80), "white": (0.96, 0.96, 0.96)}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": (0.09, 0.13), "large": (0.17, 0.23)}  # half-size as a fraction of min(H, W)


def direction(v):
    """The word for an image-space velocity (vx, vy): the dominant axis; y grows downwards."""
    vx, vy = v
    if vx == 0 and vy == 0:
        return "still"
    if abs(vx) >= abs(vy):
        return "left" if vx < 0 else "right"
    return "up" if vy < 0 else "down"


MOVING = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
          "still": "that stays still"}


def _inside(kind, dx, dy, r):
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)        # triangle, apex up


def render_scene(scene, H, W, T):
    """Frames Float[T,3,H,W], owner map Long[T,H,W] (0 background, k object k-1 drawn k-th), and the true flow
    Float[T,2,H,W] from each frame into frame 1. Every position and velocity is a whole number of pixels, so the
    flow is exact: frame_i(p) = frame_1(p + flow_i(p)) wherever the same surface is visible in both. All T frames
    are drawn at once."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    t = np.arange(T)[:, None, None]                                     # [T, 1, 1], whole frames
    shift = lambda v: (v * t).astype(np.float32)                        # v px a frame, exact in float32
    bg, pan = scene["background"], scene["pan"]
    tx, ty = xs - shift(pan[0]), ys - shift(pan[1])                     # background texture coordinates, [T, H, W]
    frames = np.zeros((T, 3, H, W), np.float32)
    for (fx, fy, ph, col) in bg:                                        # waves of several scales and directions
        frames += np.asarray(col, np.float32)[:, None, None] * (0.5 + 0.5 * np.sin(fx * tx + fy * ty + ph))[:, None]
    owner = np.zeros((T, H, W), np.int64)
    flow = np.zeros((T, 2, H, W), np.float32)
    flow[:, 0], flow[:, 1] = -pan[0] * t, -pan[1] * t
    for k, ob in enumerate(scene["objects"], start=1):
        (x, y), (vx, vy) = ob["pos"], ob["vel"]
        dx, dy = xs - (x + shift(vx)), ys - (y + shift(vy))             # from the object's centre, [T, H, W]
        inside = _inside(ob["kind"], dx, dy, ob["r"])
        dx, dy = dx[inside], dy[inside]
        fx, fy, ph = ob["texture"]                                      # a 2-D pattern: no aperture problem
        shade = 0.6 + 0.4 * np.sin(fx * dx + fy * dy + ph) * np.sin(fy * dx - fx * dy + 2 * ph)
        frames.transpose(0, 2, 3, 1)[inside] = shade[:, None] * np.asarray(COLORS[ob["color"]], np.float32)
        owner[inside] = k
        frame = inside.nonzero()[0]                                     # the frame of each pixel inside
        flow[:, 0][inside], flow[:, 1][inside] = -vx * frame, -vy * frame
    return torch.from_numpy(frames.clip(0, 1)), torch.from_numpy(owner), torch.from_numpy(flow)


def make_scene(rng, H, W, T):
    """1-3 objects (1 in about 8% of scenes); the first one made is the referring target. The scene lists them in
    drawing order (later covers earlier), the target's place in that list under "target". Confusers make the words
    necessary: an object of the same kind in another colour, or of the same colour and kind moving another way, or of
    the same colour, another kind. Objects may start near an edge and leave the frame, and may pass behind one
    another."""
    m = min(H, W)
    vmax = max(3, round(0.04 * m))  # px per frame; at least 3, or Eq. (1) in small frames is met without motion (README)

    def new_object(kind=None, color=None, size=None, vel=None):
        size = size or str(rng.choice(list(SIZES)))
        r = max(2, round(rng.uniform(*SIZES[size]) * m))
        if rng.random() < 0.2:                                          # start near an edge, maybe leave
            pos = (int(rng.choice([r // 2, W - 1 - r // 2])), int(rng.integers(r, max(r + 1, H - r))))
        else:
            pos = (int(rng.integers(r, max(r + 1, W - r))), int(rng.integers(r, max(r + 1, H - r))))
        if vel is None:
            vel = (int(rng.integers(-vmax, vmax + 1)), int(rng.integers(-vmax, vmax + 1)))
        return {"kind": kind or str(rng.choice(KINDS)), "color": color or str(rng.choice(list(COLORS))),
                "size": size, "r": r, "pos": pos, "vel": vel,
                "texture": (float(rng.uniform(0.4, 1.0)), float(rng.uniform(0.4, 1.0)), float(rng.uniform(0, 6.3)))}

    target = new_object()
    objects = [target]
    confuser = rng.integers(0, 4)
    if confuser == 0:   # same kind, another colour
        objects.append(new_object(kind=target["kind"], color=str(rng.choice([c for c in COLORS if c != target["color"]]))))
    elif confuser == 1:  # same colour and kind, another direction
        other = [v for v in [(-vmax, 0), (vmax, 0), (0, -vmax), (0, vmax), (0, 0)]
                 if direction(v) != direction(target["vel"])]
        objects.append(new_object(kind=target["kind"], color=target["color"], vel=tuple(other[rng.integers(len(other))])))
    elif confuser == 2:  # same colour, another kind
        objects.append(new_object(kind=str(rng.choice([k for k in KINDS if k != target["kind"]])), color=target["color"]))
    for _ in range(rng.integers(0, 3 - (confuser < 3))):
        objects.append(new_object())
    order = rng.permutation(len(objects))                               # drawing order: later covers earlier
    background = []
    for _ in range(6):  # broadband texture, so that a wrong flow costs photometric error almost everywhere
        freq, angle = rng.uniform(0.15, 1.0), rng.uniform(0, np.pi)
        background.append((float(freq * np.cos(angle)), float(freq * np.sin(angle)), float(rng.uniform(0, 6.3)),
                           tuple(float(c) for c in rng.uniform(0.0, 0.3, 3))))
    pan = (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))) if rng.random() < 0.3 else (0, 0)
    drawn = [objects[i] for i in order]
    return {"objects": drawn, "target": int(np.nonzero(order == 0)[0][0]), "background": background, "pan": pan}


def caption(scene):
    """'a small red circle moves while a large blue square stays still, as the camera pans': what moves, not where.
    A caption that named each object's direction would be a flow label in words: read whole, the decoder takes the
    flow from it instead of from the frames; at 64x96 even "as the camera pans" kept the decoder from the frames for
    5500 steps (it smeared the background), against 3000-3500 without it (README, "How the miniature learns flow")."""
    parts = [f"a {o['size']} {o['color']} {o['kind']} {'stays still' if direction(o['vel']) == 'still' else 'moves'}"
             for o in scene["objects"]]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " while " + parts[-1]
    return text + (", as the camera pans" if scene["pan"] != (0, 0) else "")


def referring_expression(scene, rng):
    """One expression that picks out the target and no other object, chosen at random among the unique ones
    with the fewest words; None when no candidate is unique (SyntheticClips then draws another scene)."""
    objs, t = scene["objects"], scene["target"]
    o = objs[t]
    d = direction(o["vel"])
    cands = [
        ("the {kind}", lambda x: x["kind"] == o["kind"]),
        ("the {color} {kind}", lambda x: (x["color"], x["kind"]) == (o["color"], o["kind"])),
        ("the {color} shape", lambda x: x["color"] == o["color"]),
        ("the {kind} " + MOVING[d], lambda x: x["kind"] == o["kind"] and direction(x["vel"]) == d),
        ("the shape " + MOVING[d], lambda x: direction(x["vel"]) == d),
        ("the {size} {kind}", lambda x: (x["size"], x["kind"]) == (o["size"], o["kind"])),
        ("the {color} {kind} " + MOVING[d], lambda x: (x["color"], x["kind"]) == (o["color"], o["kind"])
         and direction(x["vel"]) == d),
        ("the {size} {color} {kind} " + MOVING[d], lambda x: (x["size"], x["color"], x["kind"]) ==
         (o["size"], o["color"], o["kind"]) and direction(x["vel"]) == d),
    ]
    same_colour = [x for x in objs if x["color"] == o["color"]]
    if len(same_colour) == 2 and same_colour[0]["r"] != same_colour[1]["r"]:
        bigger = o["r"] == max(x["r"] for x in same_colour)
        word = "larger" if bigger else "smaller"
        cands.append((f"the {word} {{color}} shape", lambda x: x is o))
    unique = [fmt for fmt, match in cands if sum(match(x) for x in objs) == 1]
    if not unique:
        return None
    fewest = min(len(f.split()) for f in unique)
    fmt = str(rng.choice([f for f in unique if len(f.split()) == fewest]))
    return fmt.format(kind=o["kind"], color=o["color"], size=o["size"])


class SyntheticClips(ClipDataset):
    """Procedural clips, deterministic from (seed, split, index). split: pretrain (captions; the default run),
    pretrain_val (held-out clips for the flow EPE), train (a small labelled R-VOS set), val (held-out R-VOS).
    Every item carries the caption-or-expression text, masks/boxes/valid of the target, and the true flow, except
    augmented items (train and val with train=True), whose frames the flow no longer describes."""

    SPLITS = {"pretrain": (1, 100_000), "pretrain_val": (2, 64), "train": (3, 256), "val": (4, 64)}

    def __init__(self, cfg, split, train, seed=0, size=None):
        if split not in self.SPLITS:
            raise ValueError(f"synthetic split must be one of {sorted(self.SPLITS)}, got {split!r}")
        super().__init__(cfg, train, seed)
        self.split = split
        self.code, n = self.SPLITS[split]
        self.items = range(size or n)
        self.rvos = split in ("train", "val")
        self.layout = f"generated, no files (split {split}, seed {seed})"
        self.summary = {"clips": len(self.items), "frames": len(self.items) * cfg.num_frames}

    def rng(self, index):  # the scene depends on (seed, split, index) only; augmentation also on the epoch
        # epoch + 1: numpy seeds [s, c, i, 0] and [s, c, i] are one stream, so epoch 0's flips and crops would
        # repeat the scene's own draws (the target's box centre then averaged 0.70 of the width, not 0.5)
        return np.random.default_rng([self.seed, self.code, index, self.epoch + 1])

    def scene(self, index):
        H, W = self.cfg.frame_size
        srng = np.random.default_rng([self.seed, self.code, index])
        while True:
            scene = make_scene(srng, H, W, self.cfg.num_frames)
            text = caption(scene) if self.split.startswith("pretrain") else referring_expression(scene, srng)
            if text:
                return scene, text

    def texts(self, n):  # the first n: every scene is an independent draw, as good a sample as any other n
        return [self.scene(i)[1] for i in range(min(n, len(self)))]

    def load(self, index, rng):
        H, W = self.cfg.frame_size
        T = self.cfg.num_frames
        scene, text = self.scene(index)
        frames, owner, flow = render_scene(scene, H, W, T)
        masks = owner == scene["target"] + 1
        boxes, valid = boxes_from_masks(masks)
        item = {"frames": frames, "text": text, "id": (f"synthetic-{self.split}-{index:06d}", "0", 0),
                "masks": masks, "boxes": boxes, "valid": valid, "flow": flow, "owner": owner}
        if not self.train:
            item.update(orig_size=(H, W), frame_names=[f"{t:05d}" for t in range(T)], num_real=T)
        return item


# ----------------------------------------------------------------------------------------------------------
# Real formats
# ----------------------------------------------------------------------------------------------------------

class SMiT(ClipDataset):
    """Spoken Moments in Time: videos/<name>.mp4 (read with PyAV when installed) or frames/<name>/*.jpg; the
    caption is the first line of transcriptions/<name>.txt; <split>.txt lists one name a line. Clips: sliding
    windows over the video, each of T frames `stride` (6, Sec. 4.1) apart; consecutive windows share an end frame.
    Not augmented (Sec. 4.1)."""

    rvos = False

    @staticmethod
    def text_of(entry):
        return entry[3]

    def __init__(self, root, split, cfg, train, seed=0, skip_bad=False, stride=6):
        super().__init__(cfg, train, seed, skip_bad)
        root = need(root, "the S-MiT root with videos/ or frames/, transcriptions/ and <split>.txt")
        listing = need(root / f"{split}.txt", "one video name a line").read_text(encoding="utf-8")
        need(root / "transcriptions", "the captions, transcriptions/<name>.txt")
        names = [n.strip() for n in listing.splitlines() if n.strip()]
        self.stride, empty, bad = stride, [], []
        T = cfg.num_frames
        self.summary = {"videos": 0, "frames": 0}
        kinds = {"frames/<name>/*.jpg": 0, "videos/<name>.mp4": 0}
        shown = time.monotonic()
        for v, name in enumerate(names):
            if time.monotonic() - shown > 30 and os.environ.get("RANK", "0") == "0":  # 500k videos take minutes
                print(f"S-MiT {split}: {v} of {len(names)} videos read", file=sys.stderr, flush=True)
                shown = time.monotonic()
            cap_file = root / "transcriptions" / f"{name}.txt"
            lines = cap_file.read_text(encoding="utf-8", errors="replace").splitlines() if cap_file.is_file() else []
            text = clean_text(lines[0]) if lines else ""
            if not text:
                empty.append(cap_file)
                continue
            # the frames are counted, not kept, and listed again for each clip (500k videos' frames as Paths: 11 GiB)
            frames_dir = root / "frames" / name
            n = len(listed(frames_dir, "*.jpg"))
            source = frames_dir if n else root / "videos" / f"{name}.mp4"
            try:
                if not n and not source.is_file():
                    raise FileNotFoundError(f"{source} not found (nor {frames_dir}/*.jpg)")
                n = n or _count_video_frames(source)
            except (FileNotFoundError, BadFile):
                if not skip_bad:
                    raise
                bad.append(source)
                continue
            kinds["frames/<name>/*.jpg" if source == frames_dir else "videos/<name>.mp4"] += 1
            self.summary["videos"] += 1
            self.summary["frames"] += n
            step = stride * (T - 1)
            for s in range(0, max(n - step, 1), step):  # windows of T frames `stride` apart, sharing end frames
                self.items.append((name, source, [min(s + stride * j, n - 1) for j in range(T)], text))
        self.layout = (f"S-MiT: {split}.txt, captions from transcriptions/<name>.txt, "
                       + ", ".join(f"{n} videos as {k}" for k, n in kinds.items()))
        if empty:
            note(f"S-MiT {split}: skipped {len(empty)} videos with an empty or missing caption "
                 f"({some(empty)})")
        if bad:
            note(f"S-MiT {split}: skipped {len(bad)} videos missing or unreadable ({some(bad)})")

    def load(self, entry, rng):
        name, source, idx, text = entry
        size = self.cfg.frame_size
        if source.suffix != ".mp4":                              # frames/<name>, gone or not
            files = sorted(listed(source, "*.jpg"), key=frame_order)
            if len(files) <= max(idx):
                raise BadFile(f"{source}: {len(files)} .jpg frames, fewer than when the dataset was built")
            frames = torch.stack([read_rgb(source / files[i], size)[0] for i in idx])
        else:
            frames = read_video_frames(source, idx, size)
        return {"frames": frames, "text": text, "id": (name, "0", idx[0])}


def listed(folder, pattern):
    """The names of a folder's files that match pattern ("*.jpg"), as glob.glob matches them (the official DAVIS
    code lists its frames and annotations so): hidden files left out (macOS's ._ copy of each file, written beside it
    on a non-Mac disk), the case folded on Windows only (.JPG too); in the order listed, none where the folder is
    missing."""
    try:
        return [f for f in os.listdir(folder) if not f.startswith(".") and fnmatch.fnmatch(f, pattern)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def open_video(path, expected):
    """PyAV and the opened container of a video file that has a video stream; otherwise a BadFile naming the file
    (unreadable, or without a video stream: an audio file) and what was `expected`."""
    av = _pyav(path)
    try:
        c = av.open(str(path))
    except av.FFmpegError as e:
        raise BadFile(f"{path}: unreadable video ({e}); {expected}") from e
    if not c.streams.video:
        c.close()
        raise BadFile(f"{path}: no video stream (an audio file?); {expected}")
    return av, c


def decode_video(av, c, path, expected):
    """The frames of open_video's container, its first video stream; a decoding error midway (a cut file) is a
    BadFile naming the file and what was `expected`."""
    try:
        yield from c.decode(video=0)
    except av.FFmpegError as e:
        raise BadFile(f"{path}: unreadable video ({e}); {expected}") from e


def _count_video_frames(path):
    expected = "expected an .mp4 with a video stream"
    av, c = open_video(path, expected)
    with c:
        n = c.streams.video[0].frames
        return n if n > 0 else sum(1 for _ in decode_video(av, c, path, expected))


def _pyav(path):
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: reading .mp4 needs PyAV (pip install av), or extract JPEG frames with "
                         f"ffmpeg -i {path} -q:v 2 frames/<name>/%05d.jpg") from None
    return av


def upright(frame):
    """A decoded PyAV frame as an RGB image, turned as its display matrix says, as players show it (a phone's portrait
    video stores landscape pixels and -90 degrees: PyAV's frame.rotation, counterclockwise; PyAV before 14 reads no
    rotation and leaves the frame as stored)."""
    im = frame.to_image().convert("RGB")
    turn = round(getattr(frame, "rotation", 0) / 90) * 90 % 360
    return im.transpose({90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                         270: Image.Transpose.ROTATE_270}[turn]) if turn else im


def read_video_frames(path, indices, size):
    av = _pyav(path)
    want, got = set(indices), {}
    try:
        with av.open(str(path)) as c:
            for i, fr in enumerate(c.decode(video=0)):
                if i in want:
                    im = upright(fr).resize((size[1], size[0]), Image.BILINEAR)
                    got[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
                if i >= max(want):
                    break
    except Exception as e:  # PyAV raises its own error types
        raise BadFile(f"{path}: unreadable video ({e})") from e
    if not got:
        raise BadFile(f"{path}: no frames decoded")
    return torch.stack([got.get(i, got[max(got)]) for i in indices])  # past the end: the last decoded frame


class VideoExpressions(ClipDataset):
    """Shared by Ref-YouTube-VOS, Ref-DAVIS17 and VISOR: videos of JPEG frames with indexed-PNG annotations and
    one expression per (video, expression id) naming an object id. self.videos[vid] = (frame paths, annotation
    paths or None); self.exprs = [(vid, exp_id, text, obj_id)]."""

    def __init__(self, cfg, train, seed=0, skip_bad=False):
        super().__init__(cfg, train, seed, skip_bad)
        self.videos, self.exprs, self.empty = {}, [], []

    @staticmethod
    def text_of(entry):
        return entry[0][2]

    def add_expression(self, vid, exp_id, text, obj_id):
        text = clean_text(text)
        if not text:
            self.empty.append(f"{vid} expression {exp_id}")
            return
        self.exprs.append((vid, str(exp_id), text, int(obj_id)))

    def finish(self, what):
        if self.empty:
            note(f"{what}: skipped {len(self.empty)} empty expressions ({some(self.empty)})")
        self.summary = {"videos": len(self.videos), "frames": sum(len(f) for f, _ in self.videos.values()),
                        "expressions": len(self.exprs)}
        if any(a is not None for _, a in self.videos.values()):   # objects referred to (annotated splits only)
            self.summary["objects"] = len({(vid, obj) for vid, _, _, obj in self.exprs})
        T = self.cfg.num_frames
        for e in self.exprs:
            n = len(self.videos[e[0]][0])
            if self.train:
                self.items.append((e, None, T))
            else:
                self.items += [(e, idx, real) for _, idx, real in eval_clips(n, T)]

    def load(self, entry, rng):
        (vid, exp_id, text, obj_id), idx, real = entry
        frames_p, annos_p = self.videos[vid]
        if idx is None:
            idx = clip_indices(len(frames_p), self.cfg.num_frames, rng)
        size = self.cfg.frame_size
        loaded = [read_rgb(frames_p[i], size) for i in idx]
        item = {"frames": torch.stack([f for f, _ in loaded]), "text": text, "id": (vid, exp_id, idx[0])}
        if annos_p is not None:  # a frame without its PNG (None, VISOR's) shows none of the objects
            masks = torch.stack([torch.zeros(size, dtype=torch.bool) if annos_p[i] is None else
                                 resize_mask(read_index_png(annos_p[i]) == obj_id, size) for i in idx])
            item["masks"] = masks
            item["boxes"], item["valid"] = boxes_from_masks(masks)
        if not self.train:
            item.update(orig_size=loaded[0][1], frame_names=[Path(frames_p[i]).stem for i in idx], num_real=real)
        return item


def _video_frames(jpeg_dir, anno_dir, vid, names=None):
    jdir = jpeg_dir / vid
    files = [f"{n}.jpg" for n in names] if names else sorted(listed(jdir, "*.jpg"), key=frame_order)
    frames = [jdir / f for f in files]
    if not frames:
        raise FileNotFoundError(f"{jdir}: no JPEG frames")
    annos = [anno_dir / vid / f"{f.stem}.png" for f in frames] if anno_dir is not None else None
    return frames, annos


def _ytvos_layout(root, split, what, annotations):
    """The Ref-YouTube-VOS layout (also the converted Ref-DAVIS17's): the split's expressions, its JPEG folder and,
    where the split has them, its annotation folder."""
    root = need(root, f"the {what} root (train/, valid/, meta_expressions/)")
    if split not in ("train", "valid"):
        raise ValueError(f"{what} split must be train or valid, got {split!r}")
    meta = read_expressions(root / "meta_expressions" / split / "meta_expressions.json", f"the {what} expression file",
                            obj_ids=annotations)
    jpeg = need(root / split / "JPEGImages", "one folder of JPEG frames per video")
    anno = need(root / split / "Annotations", "one folder of indexed PNGs per video") if annotations else None
    return meta, jpeg, anno


class RefYouTubeVOS(VideoExpressions):
    """train/JPEGImages/<vid>/<frame>.jpg, train/Annotations/<vid>/<frame>.png, and
    meta_expressions/{train,valid}/meta_expressions.json ({"videos": {vid: {"expressions": {exp_id: {"exp",
    "obj_id"}}, "frames": [...]}}}). The valid split (no annotations) keeps only the 202 videos that are not in
    meta_expressions/test."""

    def __init__(self, root, split, cfg, train, seed=0, skip_bad=False):
        super().__init__(cfg, train, seed, skip_bad)
        if train and split == "valid":  # its first item failed with KeyError 'masks'
            raise ValueError("Ref-YouTube-VOS valid has no annotations to train on: train=True takes split='train'")
        meta, jpeg, anno = _ytvos_layout(root, split, "Ref-YouTube-VOS", annotations=(split == "train"))
        skip = set()
        if split == "valid":  # the download's valid folders hold the test videos too
            skip = set(read_expressions(Path(root) / "meta_expressions" / "test" / "meta_expressions.json",
                                        "the test videos' expression file (valid is the videos not listed there)"))
        for vid, v in sorted(meta.items()):
            if vid in skip:
                continue
            self.videos[vid] = _video_frames(jpeg, anno, vid, v.get("frames"))
            for exp_id, e in v["expressions"].items():
                self.add_expression(vid, exp_id, e["exp"], e.get("obj_id", 0))
        self.layout = (f"Ref-YouTube-VOS: meta_expressions/{split}/meta_expressions.json, {split}/JPEGImages"
                       + (f", {split}/Annotations" if anno else "")
                       + (f"; {len(skip & set(meta))} test videos (meta_expressions/test) left out" if skip else ""))
        self.finish(f"Ref-YouTube-VOS {split}")


def davis17_layout(root):
    """Which Ref-DAVIS17 layout is under root: "converted" (meta_expressions/, what the common conversion writes) or
    "original" (DAVIS/ and davis_text_annotations/, the unpacked downloads). The converted layout is looked for
    first: the conversion moves the videos out of DAVIS/ and leaves the emptied folder behind."""
    root = need(root, "the Ref-DAVIS17 root (DAVIS/ and davis_text_annotations/, or the converted layout)")
    if (root / "meta_expressions").is_dir():
        return "converted"
    if (root / "DAVIS").is_dir():
        return "original"
    raise FileNotFoundError(f"{root / 'DAVIS'} not found: expected the DAVIS 2017 tree beside davis_text_annotations/"
                            f" (the original downloads), or meta_expressions/ (the converted layout)")


# The four text files of the Ref-DAVIS17 release, in the order of the expression ids 4k + a (a = 0..3), with the
# encodings the common conversion reads them in; and its corrections of video names that they spell differently.
DAVIS_TEXT_FILES = (("Davis17_annot1.txt", "utf-8"), ("Davis17_annot1_full_video.txt", "utf-8"),
                    ("Davis17_annot2.txt", "latin-1"), ("Davis17_annot2_full_video.txt", "latin-1"))
DAVIS_NAME_FIXES = {"clasic-car": "classic-car", "dog-scale": "dogs-scale", "motor-bike": "motorbike"}


def read_davis_text(path, encoding):
    """{video: [(obj_id, expression), ...]} from one Ref-DAVIS17 text file, parsed as the common conversion
    (ReferFormer's tools/data/convert_davis_to_ytvos.py) parses it: lines `video obj_id "expression"`; the
    expression is the rest of the line with whitespace runs made single spaces, less its first and last character
    (the quotes); video names corrected by DAVIS_NAME_FIXES; each video's entries sorted by obj_id compared as
    strings ("10" before "2"), ties in file order."""
    need(path, "a Ref-DAVIS17 text file (lines: video object_id \"expression\")")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not {encoding} text ({e})") from e
    videos = {}
    # split("\n"), not splitlines(): annotator 2's latin-1 files may hold byte 0x85, which splitlines() would take
    # for a line end; here, as in the conversion, it is whitespace inside the line
    for n, line in enumerate(text.split("\n"), 1):
        words = line.split()
        if not words:
            continue
        if len(words) < 2 or not words[1].isdecimal():
            raise ValueError(f"{path}, line {n}: expected `video object_id \"expression\"`, got {line.strip()!r}")
        vid = DAVIS_NAME_FIXES.get(words[0], words[0])
        videos.setdefault(vid, []).append((words[1], " ".join(words[2:])[1:-1]))
    return {vid: sorted(entries, key=lambda e: e[0]) for vid, entries in videos.items()}


class RefDAVIS17(VideoExpressions):
    """Ref-DAVIS17 in either layout (davis17_layout tells which):
    - original: the unpacked downloads under root: DAVIS/JPEGImages/480p/<vid>/*.jpg, DAVIS/Annotations_unsupervised/
      480p/<vid>/*.png, DAVIS/ImageSets/2017/{train,val}.txt and davis_text_annotations/Davis17_annot{1,2}.txt,
      Davis17_annot{1,2}_full_video.txt (annotator 2's in latin-1);
    - converted: the Ref-YouTube-VOS layout the common conversion makes of them: {train,valid}/JPEGImages,
      {train,valid}/Annotations, meta_expressions/{train,valid}/meta_expressions.json.
    Both give the same items with the conversion's ids: for the k-th object of a video (the k-th line of each text
    file for the video, after read_davis_text's sort), expression 4k + a: a = 0 first-frame annotator 1, 1 full-video
    annotator 1, 2 first-frame annotator 2, 3 full-video annotator 2; the conversion pairs the files' k-th lines
    up to the shortest file's count, and so does this. `annotation` (0-3) keeps one of the four runs. split: train
    or valid (DAVIS's val)."""

    RUNS = ("annotator 1, first frame", "annotator 1, full video", "annotator 2, first frame", "annotator 2, full video")

    def __init__(self, root, split, cfg, train, seed=0, skip_bad=False, annotation=None):
        super().__init__(cfg, train, seed, skip_bad)
        if davis17_layout(root) == "converted":
            meta, jpeg, anno = _ytvos_layout(root, split, "converted Ref-DAVIS17", annotations=True)
            for vid, v in sorted(meta.items()):
                self.videos[vid] = _video_frames(jpeg, anno, vid, v.get("frames"))
                for exp_id, e in v["expressions"].items():
                    self.add_expression(vid, exp_id, e["exp"], e["obj_id"])
            self.layout = (f"Ref-DAVIS17 converted to the Ref-YouTube-VOS layout: meta_expressions/{split}/"
                           f"meta_expressions.json, {split}/JPEGImages, {split}/Annotations")
        else:
            self.read_original(root, split)
        if annotation is not None:
            self.exprs = [e for e in self.exprs if int(e[1]) % 4 == annotation]
        self.finish(f"Ref-DAVIS17 {split}")

    def read_original(self, root, split):
        if split not in ("train", "valid"):
            raise ValueError(f"Ref-DAVIS17 split must be train or valid, got {split!r}")
        davis = root / "DAVIS"
        listing = davis / "ImageSets" / "2017" / f"{'val' if split == 'valid' else 'train'}.txt"
        vids = need(listing, "the DAVIS 2017 split, one video a line").read_text(encoding="utf-8").split()
        jpeg = need(davis / "JPEGImages" / "480p", "one folder of JPEG frames per video")
        anno = need(davis / "Annotations_unsupervised" / "480p", "one folder of indexed PNGs per video")
        texts = [read_davis_text(root / "davis_text_annotations" / f, enc) for f, enc in DAVIS_TEXT_FILES]
        unpaired, undescribed = 0, []
        for vid in sorted(vids):
            self.videos[vid] = _video_frames(jpeg, anno, vid)
            runs = [t.get(vid, []) for t in texts]
            if not any(runs):
                undescribed.append(vid)
            unpaired += sum(map(len, runs)) - 4 * min(map(len, runs))
            for k, entries in enumerate(zip(*runs)):
                for a, (obj_id, text) in enumerate(entries):
                    self.add_expression(vid, 4 * k + a, text, obj_id)
        if unpaired:
            note(f"Ref-DAVIS17 {split}: skipped {unpaired} expressions of objects that not all four text "
                 f"files describe (the conversion pairs the files' lines per video up to the shortest)")
        if undescribed:
            note(f"Ref-DAVIS17 {split}: {len(undescribed)} videos of {listing} have no expression in "
                 f"davis_text_annotations/: {' '.join(undescribed)}")
        self.layout = (f"Ref-DAVIS17 original downloads: {listing.relative_to(root)}, DAVIS/JPEGImages/480p, "
                       f"DAVIS/Annotations_unsupervised/480p, davis_text_annotations/"
                       f"{{{','.join(f for f, _ in DAVIS_TEXT_FILES)}}}")


class VISOR(VideoExpressions):
    """The official VISOR-to-DAVIS conversion: JPEGImages/480p/<seq>/*.jpg, Annotations/480p/<seq>/*.png (none for
    a frame where no object of the mapping is visible), ImageSets/2022/{train,val}.txt, {train,val}_data_mapping.json
    ({seq: {object index: name}}). Each object's name, with ':' read as a space ("board:chopping" -> "board
    chopping"), is its referring expression."""

    def __init__(self, root, split, cfg, train, seed=0, skip_bad=False):
        super().__init__(cfg, train, seed, skip_bad)
        root = need(root, "the VISOR root converted to the DAVIS layout")
        seqs = [s.strip() for s in need(root / "ImageSets" / "2022" / f"{split}.txt", "one sequence a line")
                .read_text(encoding="utf-8").splitlines() if s.strip()]
        mapping_path = root / f"{split}_data_mapping.json"
        mapping = read_json(mapping_path, "{seq: {object index: name}}")
        jpeg = need(root / "JPEGImages" / "480p", "one folder of JPEG frames per sequence")
        anno = need(root / "Annotations" / "480p", "one folder of indexed PNGs per sequence")
        for seq in seqs:
            if not isinstance(mapping, dict) or not isinstance(mapping.get(seq), dict):
                raise BadFile(f"{mapping_path}: no entry for sequence {seq}; expected {{seq: {{object index: name}}}}")
            try:                                                     # indices are numbers, names "noun:part" text
                objects = sorted((int(k), k, name.replace(":", " ")) for k, name in mapping[seq].items())
            except (ValueError, AttributeError) as e:
                raise BadFile(f"{mapping_path}: sequence {seq}: {type(e).__name__} {e}; expected "
                              f"{{seq: {{object index: name}}}}") from e
            frames, annos = _video_frames(jpeg, anno, seq)
            # the conversion writes a frame's PNG only where some object of the mapping is visible
            self.videos[seq] = frames, [p if p.is_file() else None for p in annos]
            for obj_id, key, name in objects:
                self.add_expression(seq, key, name, obj_id)
        self.layout = (f"VISOR in the DAVIS layout: ImageSets/2022/{split}.txt, {split}_data_mapping.json, "
                       f"JPEGImages/480p, Annotations/480p")
        self.finish(f"VISOR {split}")


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what a pickle can build without naming a class or function: lists, dicts, tuples, sets, str,
    bytes, numbers, booleans, None. Every way a pickle runs code (a callable for REDUCE, a class for OBJ/NEWOBJ/INST,
    an extension code) goes through find_class, which refuses all; persistent ids are refused by default."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}: only plain containers and scalars are admitted")


def load_plain_pickle(path):
    """A pickle of plain containers and scalars (Python 2 strings read as ASCII, as pickle.load does); anything
    else fails with an error naming the file, before any of its code could run."""
    need(path, "a pickle")
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except Exception as e:  # a corrupt pickle raises any of a dozen types (EOFError, KeyError, UnicodeDecodeError...)
        raise ValueError(f"{path}: not a pickle of plain containers and scalars ({type(e).__name__}: {e})") from e


def _refcoco_converted(path):
    """(image entry, its annotations, sentence) for each image entry of a converted instances_<dataset>_train.json."""
    what = "the converted RefCOCO annotations (images with a caption each, annotations with polygons)"
    d = read_json(path, what)
    try:
        by_image = {}
        for a in d["annotations"]:
            by_image.setdefault(a["image_id"], []).append(_polygons(a, path))
        return [(im, by_image.get(im["id"], []), im.get("caption", "")) for im in d["images"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: {type(e).__name__} {e}; expected {what}") from e


def _polygons(ann, path):
    """A COCO annotation of `path` whose segmentation is polygons, as RefCOCO's are (an RLE one is a dict)."""
    if not isinstance(ann.get("segmentation"), list):
        raise ValueError(f"{path}: annotation {ann.get('id')}: segmentation {type(ann.get('segmentation')).__name__}"
                         f", expected polygons (lists of x, y)")
    return ann


def _refcoco_original(refs_path, instances_path):
    """The same from the original release, as the common conversion (ReferFormer's tools/data/
    convert_refexp_to_coco.py, through the refer API) makes them: the refs of the train split in the order of the
    refs file, one entry per sentence (its `sent`), numbered 1, 2, ... through the file; the image and the
    annotation looked up by id in instances.json."""
    refs = load_plain_pickle(refs_path)
    what = "the COCO instances of the refs (images, annotations with polygons)"
    inst = read_json(instances_path, what)
    try:
        images = {im["id"]: im for im in inst["images"]}
        annos = {a["id"]: a for a in inst["annotations"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{instances_path}: {type(e).__name__} {e}; expected {what}") from e
    out = []
    try:
        for ref in refs:
            if ref["split"] != "train":
                continue
            if ref["image_id"] not in images or ref["ann_id"] not in annos:
                raise ValueError(f"{instances_path}: no image {ref['image_id']} or no annotation {ref['ann_id']} "
                                 f"(named by ref {ref['ref_id']} of {refs_path})")
            im, ann = images[ref["image_id"]], _polygons(annos[ref["ann_id"]], instances_path)
            for sent in ref["sentences"]:
                out.append(({"id": len(out) + 1, "file_name": im["file_name"]}, [ann], sent["sent"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{refs_path}: expected a list of refs, dicts with ref_id, image_id, ann_id, split and "
                         f"sentences (dicts with sent); {type(e).__name__}: {e}") from e
    return out


class RefCOCO(ClipDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg, the train split, one item per sentence, images in <root>/train2014. Each
    dataset folder <root>/<dataset> holds either the original release (refs(unc).p for refcoco and refcoco+,
    refs(umd).p for refcocog, and instances.json) or its common conversion (instances_<dataset>_train.json: one
    image entry per sentence, with `caption`; annotations with polygon `segmentation` and `bbox`); both give the
    same items with the same ids. The refs files are pickles: they are read by load_plain_pickle, which admits plain
    containers and scalars only. split: one of refcoco, refcoco+, refcocog, or train for all that are present.
    Each sentence becomes a pseudo-clip of T frames, each an independent random affine transform of the image (the
    paper does not say how it makes clips of RefCOCO's images; this is the recipe its Sec. 4.2 names for the COCO
    training of STM, the reference method, with T frames for its 3; SPEC §4)."""

    VARIANTS = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}   # dataset: the refs file's split-by

    @staticmethod
    def text_of(entry):
        return entry[3]

    def __init__(self, root, split, cfg, train, seed=0, skip_bad=False):
        super().__init__(cfg, train, seed, skip_bad)
        root = need(root, "the COCO root with train2014/ and refcoco/, refcoco+/, refcocog/")
        if split != "train" and split not in self.VARIANTS:
            raise ValueError(f"refcoco split must be train or one of {tuple(self.VARIANTS)}, got {split!r}")
        self.images = need(root / "train2014", "the COCO train2014 images")
        layouts, empty = [], []
        for v in self.VARIANTS if split == "train" else (split,):
            converted, refs = root / v / f"instances_{v}_train.json", root / v / f"refs({self.VARIANTS[v]}).p"
            if converted.is_file():
                entries = _refcoco_converted(converted)
                layouts.append(f"{v}: converted ({converted.name})")
            elif refs.is_file():
                entries = _refcoco_original(refs, root / v / "instances.json")
                layouts.append(f"{v}: original release ({refs.name}, instances.json)")
            else:
                continue
            for im, annos, text in entries:
                text = clean_text(text)
                if not text:
                    empty.append(f"{v} sentence {im['id']}")
                    continue
                self.items.append((v, im, annos, text))
        if not layouts:
            names = "refcoco/, refcoco+/, refcocog/" if split == "train" else f"{split}/"
            raise FileNotFoundError(f"{root}: no RefCOCO annotations in {names}: expected refs(unc).p (refs(umd).p "
                                    f"for refcocog) and instances.json, or the converted "
                                    f"instances_<dataset>_train.json")
        if empty:
            note(f"RefCOCO: skipped {len(empty)} empty expressions ({some(empty)})")
        self.layout = "; ".join(layouts) + "; images in train2014/"
        # objects: the COCO annotation behind each sentence (the conversion keeps its id as original_id)
        self.summary = {"images": len({im["file_name"] for _, im, _, _ in self.items}),
                        "expressions": len(self.items),
                        "objects": len({(v, a.get("original_id", a["id"])) for v, _, annos, _ in self.items
                                        for a in annos})}

    def load(self, entry, rng):
        variant, im, annos, text = entry
        pil = read_image(self.images / im["file_name"])
        mask = np.zeros((pil.height, pil.width), bool)
        for a in annos:
            for poly in a["segmentation"]:
                mask |= fill_polygon(poly, pil.height, pil.width)
        mask = Image.fromarray(mask.astype(np.uint8) * 255)
        T, (H, W) = self.cfg.num_frames, self.cfg.frame_size
        frames, masks = [], []
        for _ in range(T):
            angle, scale = rng.uniform(-15, 15), rng.uniform(0.85, 1.15)
            shift = (rng.uniform(-0.1, 0.1) * pil.width, rng.uniform(-0.1, 0.1) * pil.height)
            frames.append(_affine(pil, angle, scale, shift, Image.BILINEAR).resize((W, H), Image.BILINEAR))
            masks.append(_affine(mask, angle, scale, shift, Image.NEAREST).resize((W, H), Image.NEAREST))
        frames = torch.stack([torch.from_numpy(np.asarray(f).copy()).permute(2, 0, 1) for f in frames]).float() / 255
        masks = torch.stack([torch.from_numpy(np.asarray(m) > 127) for m in masks])
        boxes, valid = boxes_from_masks(masks)
        item = {"frames": frames, "text": text, "id": (f"{variant}/{im['file_name']}", str(im["id"]), 0),
                "masks": masks, "boxes": boxes, "valid": valid}
        if not self.train:
            item.update(orig_size=(pil.height, pil.width), frame_names=[f"{t:05d}" for t in range(T)], num_real=T)
        return item


def fill_polygon(poly, H, W):
    """A COCO polygon [x1, y1, x2, y2, ...] -> Bool[H, W], pixel for pixel as pycocotools rasterizes it
    (mask.frPyObjects + mask.decode: what the refer API's getMask and ReferFormer's convert_coco_poly_to_mask give):
    rleFrPoly of pycocotools' maskApi.c in numpy. The vertices are snapped to a 1/5 px grid (C casts: truncation),
    each edge is traced through that grid, each column's crossings are taken at the column's sample point and
    rounded up to a row, and the crossings toggle the column-major run-length mask (even-odd rule). A plain
    pixel-centre test differs on the edges (1.4% of the pixels of random polygons; a small one kept 20% of its
    pixels); PIL's polygon also fills the pixels its outline touches (a 10 x 10 square: 121)."""
    xy = np.asarray(poly, np.float64).reshape(-1, 2)
    x = np.trunc(5 * xy[:, 0] + .5).astype(np.int64)                # (int)(scale * x + .5)
    y = np.trunc(5 * xy[:, 1] + .5).astype(np.int64)
    x, y = np.append(x, x[:1]), np.append(y, y[:1])
    us, vs = [], []                                                  # dense points along the boundary, 1/5 px grid
    for j in range(len(xy)):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:                                                 # (a repeated vertex: one point, its v unread)
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + .5).astype(np.int64))
        else:
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + .5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    step = u[1:] != u[:-1]                                           # points along the y-boundary, downsampled
    un, up, vn, vp = u[1:][step], u[:-1][step], v[1:][step], v[:-1][step]
    xd = (np.where(un < up, un, un - 1) + .5) / 5 - .5
    yd = np.ceil(np.clip((np.minimum(vn, vp) + .5) / 5 - .5, 0, H))
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= W - 1)
    toggles = np.zeros(W * H + 1, np.int64)                          # column-major, as the RLE counts run
    np.add.at(toggles, xd[keep].astype(np.int64) * H + yd[keep].astype(np.int64), 1)
    return (np.cumsum(toggles[:-1]) % 2 == 1).reshape(W, H).T


def _affine(img, angle, scale, shift, resample):
    """Rotate by `angle` degrees and scale about the centre, then shift (pixels)."""
    cx, cy = img.width / 2, img.height / 2
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f)
    x0, y0 = cx + shift[0], cy + shift[1]
    coeffs = (cos, sin, cx - cos * x0 - sin * y0, -sin, cos, cy + sin * x0 - cos * y0)
    return img.transform(img.size, Image.AFFINE, coeffs, resample=resample)


# ----------------------------------------------------------------------------------------------------------
# Entry point and collate
# ----------------------------------------------------------------------------------------------------------

DATASETS = {"synthetic": None, "smit": SMiT, "ytvos": RefYouTubeVOS, "davis17": RefDAVIS17,
            "refcoco": RefCOCO, "visor": VISOR}


def build_dataset(name, root, split, cfg, train, **options):
    """options: seed, and per dataset: skip_bad (the datasets read from files: bad files skipped and counted in a
    note instead of raising), size (synthetic), stride (smit), annotation (davis17, 0-3)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "synthetic":
        return SyntheticClips(cfg, split, train, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (--data-root)")
    return DATASETS[name](Path(root), split, cfg, train, **options)


def cpu_cores():
    """The cores this process may run on: its CPU affinity (a taskset's or a cpuset container's share, not the host's
    count); a CPU quota (docker --cpus, a Kubernetes CPU limit) leaves the affinity whole and is not seen."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cuda):
    """DataLoader workers per process. 0 on the CPU, where a worker takes a core from the model's threads (README,
    "What a CPU step costs"). With a GPU, this process's share of the cores less one for itself, between 1 and 16: a
    clip at 360x648 takes 60-80 ms of a core to make (synthetic, or 720p Ref-YouTube-VOS read and augmented), and a
    GPU step of the paper config takes 77-157 clips a second (README, "Performance"; the costs in "Training")."""
    if not cuda:
        return 0
    return max(1, min(16, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def read_batches(loader):
    """A DataLoader's batches. A bad file met in a worker process comes back as a BadFile whose message is the worker's
    whole traceback; it is raised again with the message the worker raised, the one that names the file."""
    try:
        yield from loader
        return
    except BadFile as e:
        text = str(e)
        if not text.startswith("Caught BadFile in DataLoader worker"):
            raise
        e.__traceback__ = None  # its frames hold the loader's iterator: freed now, the workers stop at once (left to
        # the garbage collector, a cycle through this exception, torch took 5 s to stop them)
    raise BadFile(text.rsplit("\ndata.BadFile: ", 1)[-1].strip())


class Collate:
    """Stacks tensors, tokenizes the texts with a slvp.Tokenizer (ids, mask), keeps the rest as lists. Items of several
    datasets keep what they all have (S-MiT clips have no masks, synthetic pre-training clips do); with `keys`, only
    those of them, plus the text's ids and mask (train.py's batches carry what its step reads)."""

    def __init__(self, tokenizer, max_len, keys=None):
        self.tokenizer, self.max_len, self.keys = tokenizer, max_len, keys

    def __call__(self, items):
        batch = {}
        for k in [k for k in items[0] if all(k in it for it in items) and (self.keys is None or k in self.keys)]:
            vals = [it[k] for it in items]
            batch[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        batch["ids"], batch["mask"] = self.tokenizer([it["text"] for it in items], max_len=self.max_len)
        return batch


# ----------------------------------------------------------------------------------------------------------
# The dataset inspector: python data.py NAME --data-root ROOT [--split S]
# ----------------------------------------------------------------------------------------------------------

OUTLINE = (255, 255, 0)  # the target's outline on the contact sheet: 2 px inside its edge, a black ring within


def outline(mask, width=2):
    """The pixels of a Bool[H, W] numpy mask within `width` pixels of its edge (the frame's border counts as edge)."""
    inner = mask
    for _ in range(width):
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def contact_sheet(items, height=144, gap=4):
    """One row per clip: a header (the clip's id and its expression or caption) above its T frames, each resized to
    `height` rows, the target's mask (resized nearest) outlined: the mask's pixels within 2 px of its edge in
    OUTLINE, the next ring in black (visible on any colour). Returns a PIL image."""
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 4
    rows = []
    for it in items:
        T, _, H, W = it["frames"].shape
        w = max(1, round(W * height / H))
        strip = Image.new("RGB", (T * (w + gap) - gap, height))
        for t in range(T):
            frame = (it["frames"][t].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = np.array(Image.fromarray(frame).resize((w, height), Image.BILINEAR))
            if "masks" in it:
                m = np.asarray(Image.fromarray(it["masks"][t].numpy()).resize((w, height), Image.NEAREST))
                tile[outline(m, 3)] = 0
                tile[outline(m, 2)] = OUTLINE
            strip.paste(Image.fromarray(tile), (t * (w + gap), 0))
        vid, exp_id, start = it["id"]
        caption = f"{vid} | expression {exp_id} | from frame {start}: {it['text']}"
        lines = textwrap.wrap(caption, width=max(10, int(strip.width // font.getlength("n"))))
        row = Image.new("RGB", (strip.width, len(lines) * line_h + height), (40, 40, 40))
        draw = ImageDraw.Draw(row)
        for i, line in enumerate(lines):
            draw.text((0, i * line_h + 2), line, fill=(255, 255, 255), font=font)
        row.paste(strip, (0, len(lines) * line_h))
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 2 * gap for r in rows)), (40, 40, 40))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 2 * gap
    return sheet


def main(argv=None):
    """Inspect a dataset: what was found under the root (the layout, counts, what was skipped and why) and a
    contact sheet of a few clips. Returns the sheet's path."""
    import slvp
    p = ArgumentParser(description="Inspect a dataset: print what was found under its root and write a "
                                            "contact sheet of a few clips (frames, the target outlined, the text).")
    p.add_argument("name", nargs="?", default="synthetic", choices=list(DATASETS),
                   help="the dataset, as in build_dataset (default: synthetic, the embedded world: no root)")
    p.add_argument("--data-root", type=path,
                   help="the dataset's root folder (the README's Data table lists each layout)")
    p.add_argument("--split", default="train", help="the split to read (default: train)")
    p.add_argument("--out", type=path,
                   help="where the contact sheet PNG goes (default: out/inspect/<name>-<split>.png)")
    args = p.parse_args(argv)
    # the frames a model would see: the default run's (tiny) config on the synthetic world, the paper's on real data
    cfg = slvp.SLVPConfig.tiny() if args.name == "synthetic" else slvp.SLVPConfig.paper()
    out = Path(args.out or f"out/inspect/{args.name}-{args.split}.png")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:     # formats Pillow writes
        p.error(f"--out {out}: expected an image file name (.png, .jpg)")
    if out.is_dir():
        p.error(f"--out {out} is a folder; expected an image file name")
    if problem := cannot_write(out.parent):
        p.error(f"--out {out}: {problem}")
    if args.name == "synthetic" and args.data_root:
        p.error("--data-root: the synthetic world is made here and has no root; leave it out")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = build_dataset(args.name, args.data_root, args.split, cfg, train=False)
                print(f"{args.name} {args.split}" + (f" under {args.data_root}" if args.data_root else ""))
                print(f"layout: {ds.layout}")
                print("found: " + ", ".join(f"{n} {what}" for what, n in ds.summary.items()))
                print(f"items: {len(ds)} clips of {cfg.num_frames} frames at {cfg.frame_size[0]}x{cfg.frame_size[1]}"
                      + (f" (evaluation clips, every frame covered; a training epoch takes one random window of each "
                         f"of the {len(ds.exprs)} expressions)" if hasattr(ds, "exprs") else ""))
                if not len(ds):
                    raise ValueError(f"no items in {args.name} {args.split}: nothing to show")
                picks = sorted(set(np.linspace(0, len(ds) - 1, min(4, len(ds))).round().astype(int).tolist()))
                items = [ds[i] for i in picks]
            finally:   # what was skipped and why, also before an error (every video skipped: "no items")
                for w in caught:
                    print(f"note: {w.message}")
        out.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(items).save(out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    outlined = ", the target outlined in yellow" if any("masks" in it for it in items) else ""
    print(f"wrote {out}: clips {', '.join(map(str, picks))}{outlined}")
    return out


if __name__ == "__main__":
    run_main(main)
