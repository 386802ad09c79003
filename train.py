"""
Pre-training (Eq. (1)) and transfer learning (Eqs. (5)-(7)) of SLVP.

    python train.py --mode pretrain                      # tiny model, synthetic video, a few minutes on a CPU
    python train.py --mode finetune --init out/pretrain/ckpt.safetensors
    torchrun --nproc_per_node 8 train.py --mode pretrain --config paper --data smit --data-root S-MiT \\
        --t5 t5-base/ --vit coca_ViT-B-32.bin --spm t5-base/spiece.model --batch-size 64 --out out/pretrain-paper

Writes to --out: ckpt.safetensors (the model), resume.pt (model, optimizer, schedule, step, data position and
RNG state for --resume), spm.model (the tokenizer), log.jsonl (one JSON line per log and evaluation) and, in
pre-training, flow_0.png ... flow_2.png (frames, predicted and true flow of held-out clips).
"""
import argparse
import dataclasses
import gc
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  imported before init_process_group (DDP imports it): its functions'
#                               default group, read at import, would hold the process group and gloo's threads to exit
from PIL import Image

import data
import slvp

# float32 matmuls on CUDA (the flow and box heads, kept out of bf16 autocast so that their outputs are not rounded)
# take TF32 inputs, float32 accumulation and output: the paper config's eager pre-training step at batch 16 went from
# 127.3 to 124.8 ms on an H200 (README, "Performance")
torch.backends.cuda.matmul.allow_tf32 = True


def parse_args(argv=None):
    positive, natural = data.number(int, 1), data.number(int, 0)
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["pretrain", "finetune"], default="pretrain",
                   help="pretrain: flow head and photometric loss; finetune: box and mask heads on R-VOS data "
                        "(default: %(default)s)")
    p.add_argument("--fusion", choices=["vision", "language"], default=None,
                   help="vision as query (Eq. (2), the default) or language as query (Eq. (8)); --init fixes it, "
                        "--encoders takes its checkpoint's unless given")
    p.add_argument("--config", choices=["tiny", "small", "paper"], default=None,
                   help="tiny: CPU-sized, 32x48 frames (the default); small: tiny at 64x96 frames; "
                        "paper: 360x648, p=18, T=4, L=64, T5-base + ViT-B + 8-layer decoder (--init and --encoders "
                        "take their checkpoint's)")
    p.add_argument("--data", nargs="+", default=["synthetic"], choices=list(data.DATASETS), metavar="DATA",
                   help="datasets (synthetic, smit, ytvos, davis17, refcoco, visor); several train jointly "
                        "(default: synthetic, the embedded world)")
    p.add_argument("--data-root", nargs="+", default=None, type=data.path,
                   help="one root folder per --data entry except synthetic")
    p.add_argument("--skip-bad", action="store_true",
                   help="real datasets: skip a clip whose file is unreadable or missing, counting them in a note, "
                        "instead of stopping at the first with its name")
    p.add_argument("--train-size", type=positive, default=None,
                   help="the synthetic world's number of training clips: labelled ones in fine-tuning (default: "
                        "256), captioned ones in pre-training (default: 100000)")
    p.add_argument("--t5", type=data.path, help="a Hugging Face T5 folder for the text encoder (needs --spm)")
    p.add_argument("--vit", type=data.path, help="an open_clip CoCa/CLIP or timm ViT checkpoint for the vision encoder")
    p.add_argument("--spm", type=data.path,
                   help="sentencepiece model; default: the one next to --init/--encoders, or one fit to the data")
    p.add_argument("--init", type=data.path,
                   help="finetune from this checkpoint: a pre-training's (shared weights, fresh box and mask heads) or a "
                        "fine-tuning's (its heads too, e.g. RefCOCO before Ref-YouTube-VOS); without it the decoder "
                        "starts random (with --encoders or --t5/--vit: the 'no Decoder*' rows of Table 2)")
    p.add_argument("--encoders", type=data.path,
                   help="finetune: take only the text and vision encoders (and the config and fusion, unless --fusion) "
                        "from this checkpoint (the decoder starts random): the control for --init with the same "
                        "encoders")
    p.add_argument("--freeze-text", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the text encoder (default: yes, as the paper in pre-training and in its best "
                        "Ref-DAVIS17 finetuning, Table 2; its best VISOR one, Table 3, trains it: --no-freeze-text; "
                        "with --init of a fine-tuning checkpoint, that run's choice)")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the vision encoder (default: yes in pre-training, no in finetuning; with --init of "
                        "a fine-tuning checkpoint, that run's choice)")
    p.add_argument("--steps", type=positive, default=None,
                   help="optimizer steps (default: 4500 in pretrain, where the tiny run learns the flow; 1000 in "
                        "finetune; with --resume, the resumed run's)")
    p.add_argument("--batch-size", type=positive, default=8,
                   help="global batch size (clips), split over processes (default: %(default)s)")
    # at most float32's largest / 10: AdamW's first step size is lr / (1 - beta1) = 10 lr (times 0.1 g: a move of lr),
    # passed to torch's foreach kernels as a float32 scalar (--lr 1e300 stopped there with "value cannot be converted
    # to type float")
    # and at least 1e-37, within float32's normal numbers (from 1.2e-38): 1e-300 is 0 there, and the weights stayed put
    p.add_argument("--lr", type=data.number(float, 1e-37, high=float(np.finfo(np.float32).max) / 10),
                   default=None,
                   help="peak learning rate of AdamW (default: 1e-3 in pretrain, 5e-4 in finetune)")
    p.add_argument("--weight-decay", type=data.number(float, 0), default=0.05,
                   help="AdamW weight decay on matrices (default: %(default)s)")
    p.add_argument("--warmup", type=natural, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    p.add_argument("--grad-clip", type=data.number(float, 0, strict=True), default=1.0,
                   help="gradient norm clipping (default: %(default)s)")
    p.add_argument("--seed", type=data.number(int, 0, high=2**32 - 1), default=0,
                   help="seed for initialization, data order, augmentation and the synthetic training clips themselves "
                        "(0 to 2**32-1; the held-out clips stay the same; default: %(default)s)")
    p.add_argument("--out", default=None, type=data.path, help="output folder (default: out/<mode>)")
    p.add_argument("--ckpt-every", type=positive, default=250,
                   help="write the checkpoint every N steps (and at the end; default: %(default)s)")
    p.add_argument("--eval-every", type=positive, default=250,
                   help="evaluate every N steps (and at the end; default: %(default)s)")
    p.add_argument("--eval-clips", type=positive, default=32,
                   help="held-out synthetic clips per evaluation (default: %(default)s)")
    p.add_argument("--log-every", type=positive, default=25,
                   help="print a log line every N steps (default: %(default)s)")
    p.add_argument("--workers", type=natural, default=None,
                   help="DataLoader worker processes per process (default: 0 on the CPU, where a worker would take "
                        "cores from the model's threads; with a GPU the process's share of the cores less one, "
                        "1 to 16)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its resume.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds an earlier run's checkpoint, replacing it")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"out/{args.mode}")
    pretrain = args.mode == "pretrain"
    args.steps_given = args.steps is not None                  # left out on --resume: the run's own
    args.steps = args.steps or (4500 if pretrain else 1000)
    args.lr = args.lr or (1e-3 if pretrain else 5e-4)
    args.workers = data.default_workers(torch.cuda.is_available()) if args.workers is None else args.workers
    if args.data_root is not None and len(args.data_root) != len([d for d in args.data if d != "synthetic"]):
        p.error("give one --data-root per non-synthetic --data entry, in the same order")
    if any(d != "synthetic" for d in args.data) and args.data_root is None:
        p.error(f"--data {' '.join(args.data)} needs --data-root")
    captions = [d for d in args.data if d != "synthetic" and not data.DATASETS[d].rvos]       # SMiT
    if args.mode == "finetune" and captions:
        usable = ", ".join(d for d in data.DATASETS if d == "synthetic" or data.DATASETS[d].rvos)
        p.error(f"--data {captions[0]} has captions, no masks or boxes: it is for --mode pretrain "
                f"(fine-tune on {usable})")
    labelled = [d for d in args.data if d != "synthetic" and data.DATASETS[d].rvos]
    if args.mode == "pretrain" and labelled:   # (their training clips are augmented; pre-training's are not, Sec. 4.1)
        p.error(f"--data {labelled[0]} is an R-VOS dataset: it is for --mode finetune (pre-train on smit or synthetic, "
                f"as the paper pre-trains on S-MiT)")
    if args.mode == "pretrain" and (args.init or args.encoders):
        p.error("--init and --encoders are for --mode finetune")
    if args.t5 and not args.spm:
        p.error("--t5 needs --spm (the T5 checkpoint's spiece.model)")
    if args.config and (args.init or args.encoders):
        p.error(f"--config {args.config}: --init and --encoders take their checkpoint's config; leave out --config")
    args.config = args.config or "tiny"
    if args.init and (args.encoders or args.t5 or args.vit):
        p.error("--init brings its own encoders: leave out --encoders, --t5 and --vit")
    if args.encoders and (args.t5 or args.vit):
        p.error("--encoders brings its own encoders: leave out --t5 and --vit")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.skip_bad and set(args.data) == {"synthetic"}:
        p.error("--skip-bad skips the unreadable files of real datasets; --data synthetic is made here and reads none")
    if args.train_size and "synthetic" not in args.data:
        p.error("--train-size is the number of synthetic training clips: it needs --data synthetic")
    if args.warmup is not None and args.warmup > args.steps and not (args.resume and not args.steps_given):
        p.error(f"--warmup {args.warmup} is longer than the run: expected at most --steps {args.steps}")
    return args


def check_out(args):
    """A new run never replaces the checkpoint of an earlier run: into an --out that holds one it needs --resume
    (continue that run) or --overwrite (replace it on purpose), as the Hugging Face Trainer guards its output folder."""
    ckpt, resume = args.out / "ckpt.safetensors", args.out / "resume.pt"
    if problem := data.cannot_write(args.out):
        raise SystemExit(f"error: --out {args.out}: {problem}")
    start = args.init or args.encoders                     # (not both: the parser refuses it)
    if args.overwrite and start and Path(start).resolve() in (ckpt.resolve(), resume.resolve()):
        raise SystemExit(f"error: {'--init' if args.init else '--encoders'} {start} is the checkpoint that --overwrite "
                         f"would delete: this run starts from it; choose another --out")
    if args.resume and not resume.is_file():
        raise SystemExit(f"error: --resume but {resume} does not exist; expected the --out of an earlier run")
    if not (args.resume or args.overwrite) and (ckpt.exists() or resume.exists()):
        # ckpt.safetensors without resume.pt (a run killed between its first two files, a copied checkpoint)
        cont = "continue it with --resume, " if resume.exists() else f"it has no {resume.name} to --resume from; "
        raise SystemExit(f"error: --out {args.out} holds the checkpoint of an earlier run; {cont}"
                         f"replace it with --overwrite, or choose another --out")
    if args.overwrite:  # replaced now, not at this run's first checkpoint: a --resume could continue the earlier run
        ckpt.unlink(missing_ok=True)
        resume.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------------------------

def forward_flops(cfg, fusion, task, batch, text_len):
    """Matmul FLOPs of one forward pass on `batch` clips with `text_len` tokens, by part (multiply-add = 2)."""
    T, N, d, p = cfg.num_frames, cfg.num_patches, cfg.dec_dim, cfg.patch_size

    def layer(q, kv, dim, mlp, kdim=None, inner=None, ffn_mats=2):
        inner = inner or dim
        proj = 2 * q * dim * inner * 2 + 2 * kv * (kdim or dim) * inner * 2      # q, o and k, v projections
        return proj + 2 * 2 * q * kv * inner + ffn_mats * 2 * q * dim * mlp     # scores, values; FFN

    n = N + 1                                                          # the ViT's blocks see its class token too
    vision = batch * T * (2 * N * 3 * p ** 2 * cfg.vit_dim + cfg.vit_layers * layer(n, n, cfg.vit_dim, cfg.vit_mlp))
    text = batch * cfg.t5_layers * layer(text_len, text_len, cfg.t5_dim, cfg.t5_d_ff,
                                         inner=cfg.t5_heads * cfg.t5_d_kv, ffn_mats=3 if cfg.t5_gated else 2)
    TN = T * N
    if fusion == "vision":
        dec = layer(TN, TN, d, 0, ffn_mats=0) + layer(TN, text_len, d, cfg.dec_mlp)
    else:
        dec = layer(text_len + TN, text_len + TN, d, 0, ffn_mats=0) + layer(text_len + TN, TN, d, cfg.dec_mlp)
    proj = 2 * batch * (T * N * cfg.vit_dim * d * (cfg.vit_dim != d) + text_len * cfg.t5_dim * d * (cfg.t5_dim != d))
    heads = 2 * batch * (T * N * d * p * p * 2 if task == "pretrain" else T * d * 4 + T * N * (d + 4) * p * p)
    return {"vision": vision, "text": text, "decoder": batch * cfg.dec_layers * dec + proj + heads}


def train_flops(model, batch, text_len):
    """FLOPs of one training step: forward + backward (3x forward) for trained parts, forward only for frozen
    encoders (their parameters do not require grad: autograd records nothing of them). Element-wise work is left
    out."""
    f = forward_flops(model.cfg, model.fusion, model.task, batch, text_len)
    return (f["vision"] * (1 if model.freeze_vision else 3) + f["text"] * (1 if model.freeze_text else 3)
            + 3 * f["decoder"])


def peak_flops():
    """Dense bf16 peak of the GPU (NVIDIA's datasheets), for MFU; None when unknown. The PCIe and NVL cards of a name
    peak lower than its SXM part, the L40 at half the L40S."""
    name = torch.cuda.get_device_name()
    for key, flops in (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                       ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12)):
        if key in name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------------------
# Data: a fixed permutation per epoch, split into global batches, each split over the processes
# ----------------------------------------------------------------------------------------------------------

def epoch_batches(n, global_batch, seed, epoch, rank, world):
    """The batches of one epoch for this process: global batch i is perm[i*B:(i+1)*B] and process r takes its r-th
    share, so W processes see together exactly what one process sees with the same global batch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per = global_batch // world
    return [perm[i * global_batch + rank * per:i * global_batch + (rank + 1) * per] for i in range(n // global_batch)]


def run_batches(n, global_batch, seed, epoch, batch_idx, rank, world):
    """This process's batches from batch `batch_idx` of `epoch` on, epoch after epoch, as indices into EpochItems."""
    while True:
        for b in epoch_batches(n, global_batch, seed, epoch, rank, world)[batch_idx:]:
            yield [epoch * n + i for i in b]
        epoch, batch_idx = epoch + 1, 0


class EpochItems(torch.utils.data.Dataset):
    """Item e * n + i is item i of epoch e of the training sets (n clips together): one DataLoader, its workers
    started once, serves the whole run, and each item still depends on (seed, epoch, index) alone."""

    def __init__(self, sets):
        self.sets = sets
        self.data = sets[0] if len(sets) == 1 else torch.utils.data.ConcatDataset(sets)

    def __len__(self):  # one epoch; the sampler's indices e * n + i go past it
        return len(self.data)

    def __getitem__(self, k):
        epoch, i = divmod(k, len(self.data))
        for s in self.sets:  # this process's copies (a worker's own, with workers)
            s.set_epoch(epoch)
        return self.data[i]


def build_training_data(args, cfg):
    split = "pretrain" if args.mode == "pretrain" else "train"
    roots = iter(args.data_root or [])
    sets = []
    for name in args.data:
        opts = {"seed": args.seed}
        if name == "synthetic" and args.train_size:
            opts["size"] = args.train_size
        if name != "synthetic":                                         # generated clips have no files
            opts["skip_bad"] = args.skip_bad
        root = None if name == "synthetic" else next(roots)
        sets.append(data.build_dataset(name, root, split if name == "synthetic" else "train", cfg, train=True, **opts))
        if not len(sets[-1]):  # an empty split list or expression file: nothing to fit a tokenizer to or train on
            raise ValueError(f"--data {name} --data-root {root}: no training clips (found "
                             + ", ".join(f"{n} {what}" for what, n in sets[-1].summary.items()) + ")")
    return sets


def fit_tokenizer(sets, out):
    """A small sentencepiece model (T5 conventions: <pad>=0, </s>=1, <unk>=2, no BOS) fit to up to 5000 texts of each
    training set, spread over its whole list (ClipDataset.texts). BPE, not T5's unigram: on the synthetic captions the
    unigram trainer stopped at 49 pieces, nearly letters, and most captions were cut at the tiny config's length; BPE
    keeps each word whole (README, "The default run")."""
    import sentencepiece as spm
    texts = [t for s in sets for t in s.texts(5000)]
    # fit to the texts, not to a corpus file, whose path the model would record: two runs that fit the same pieces
    # write the same bytes (the sha256 a checkpoint records of its tokenizer)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=256,
                                   model_type="bpe", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (Path(out) / "spm.model").write_bytes(model.getvalue())
    return slvp.Tokenizer(Path(out) / "spm.model")


# ----------------------------------------------------------------------------------------------------------
# Evaluation during training
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_flow(model, tokenizer, n, device, out=None, pictures=3):
    """The predicted flow against the true synthetic flow on a fixed held-out set, frames 2..T, beside the zero flow:
    epe (end-point error, px, mean over each clip's pixels, then over clips) and epe_moving (over the pixels whose
    true flow is above 0.5 px, pooled over clips), each with its zero-flow value; and the held-out photometric loss
    of Eq. (1) for the predicted, the zero and the true flow. A model that blurs lowers photo below photo_zero_flow
    without moving epe_moving; one that finds motion lowers both. With `out`, writes pictures."""
    ds = data.build_dataset("synthetic", None, "pretrain_val", model.cfg, train=False, size=n)
    collate = data.Collate(tokenizer, model.cfg.max_text_len)
    model.eval()
    sums = dict.fromkeys(["epe", "epe_zero_flow", "epe_moving", "epe_moving_zero_flow", "photo", "photo_zero_flow",
                          "photo_true_flow"], 0.0)
    moving, count = 0, 0
    for start in range(0, n, 8):
        batch = collate([ds[i] for i in range(start, min(start + 8, n))])
        frames = batch["frames"].to(device)
        pred = model.flow(frames, batch["ids"].to(device), batch["mask"].to(device)).float()
        true = batch["flow"].to(device)
        err = (pred[:, 1:] - true[:, 1:]).norm(dim=2)                         # [b, T-1, H, W]
        speed = true[:, 1:].norm(dim=2)
        move = speed > 0.5
        sums["epe"] += err.mean((1, 2, 3)).sum().item()
        sums["epe_zero_flow"] += speed.mean((1, 2, 3)).sum().item()
        sums["epe_moving"] += err[move].sum().item()
        sums["epe_moving_zero_flow"] += speed[move].sum().item()
        for key, flow in (("photo", pred), ("photo_zero_flow", torch.zeros_like(true)), ("photo_true_flow", true)):
            sums[key] += slvp.photometric_objective(frames, flow).item() * len(true)   # Eq. (1), batch mean
        moving += move.sum().item()
        count += len(true)
        if out is not None and start == 0:
            save_flow_pictures(batch, pred.cpu(), out, pictures)
    return {k: v / (max(moving, 1) if "moving" in k else count) for k, v in sums.items()}


def save_flow_pictures(batch, pred, out, k):
    """One PNG per clip: row 1 the frames, row 2 the predicted flow o_(i,1), row 3 the true flow, i = 2..T (the
    colour-wheel coding of Fig. 2, one scale per clip; white = no motion)."""
    from eval import flow_to_color, to_uint8
    for b in range(min(k, len(pred))):
        frames = to_uint8(batch["frames"][b])                              # [T, H, W, 3]
        T, H, W, _ = frames.shape
        scale = max(batch["flow"][b].norm(dim=1).max().item(), 1.0)  # longest true flow vector, at least 1 px
        rows = [np.concatenate(list(frames), 1)]
        for flow in (pred[b], batch["flow"][b]):
            blank = np.full((H, W, 3), 255, np.uint8)
            rows.append(np.concatenate([blank] + [flow_to_color(flow[t].numpy(), scale) for t in range(1, T)], 1))
        Image.fromarray(np.concatenate(rows, 0)).save(out / f"flow_{b}.png")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def atomic_save(obj, path):
    slvp.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_all(args, raw, tokenizer, opt, sched, step, epoch, batch_idx):
    """ckpt.safetensors, then resume.pt. A write that fails (a full disk or quota) stops the run with one line and
    leaves no file half-written: --resume continues from the last whole resume.pt."""
    from safetensors import SafetensorError
    try:
        slvp.save_checkpoint(args.out / "ckpt.safetensors", raw, step=step, tokenizer_sha256=tokenizer.digest())
        atomic_save({"model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": step, "epoch": epoch, "batch": batch_idx, "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "config": dataclasses.asdict(raw.cfg), "fusion": raw.fusion, "task": raw.task,
                     "run": run_settings(args), "steps": args.steps}, args.out / "resume.pt")
    except (OSError, RuntimeError, SafetensorError) as e:   # torch.save on a full disk: RuntimeError "unexpected pos"
        raise SystemExit(f"error: writing the checkpoint of step {step} to {args.out} failed ({e}: a full disk or "
                         f"quota?); no file is left half-written: --resume continues from the last whole "
                         f"resume.pt") from None


def restore_cuda_rng(states):
    """resume.pt's CUDA generator states, one per GPU the saving process saw (torchrun's processes each see all of the
    node's): restored for the GPUs this process sees. set_rng_state_all indexes torch.cuda.default_generators by
    position, so a run saved on 8 GPUs and resumed on fewer stopped with an IndexError."""
    torch.cuda.set_rng_state_all(list(states)[:torch.cuda.device_count()])


def run_settings(args):
    """What fixes the clips, their order, the place in it and the optimizer: a resumed run must keep them (--steps
    may change, to continue a run further: the cosine then ends at the new last step, the warm-up stays)."""
    return {"--batch-size": args.batch_size, "--seed": args.seed, "--data": list(args.data),
            "--train-size": args.train_size, "--lr": args.lr, "--warmup": args.warmup,
            "--weight-decay": args.weight_decay, "--grad-clip": args.grad_clip,
            "--freeze-text": args.freeze_text, "--freeze-vision": args.freeze_vision,
            "training clips": args.clips}   # per dataset: the same --data-root with other files changes the order


def trim_log(path, step):
    """Keep the lines of log.jsonl up to `step`, where a resumed run takes over: the later ones are of steps lost with
    the killed process (and its last line may be cut)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass
    slvp.atomic_write(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def read_resume(path):
    """resume.pt as save_all wrote it; unreadable or of another kind, it fails naming the file."""
    expected = "expected the resume.pt of an earlier train.py run"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, an empty file, not a pickle: RuntimeError, EOFError, UnpicklingError, and
        # from the weights-only unpickler on other bytes KeyError (a file starting with 'h' or 'j'), ValueError, ...
        raise ValueError(f"{path}: unreadable ({type(e).__name__}); {expected}") from e
    keys = {"model", "optimizer", "scheduler", "step", "epoch", "batch", "rng", "cuda_rng", "config", "fusion", "task"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(f"{path}: not a resume state; {expected}")
    return state


def read_batches(loader):
    """The loader's batches. A clip with a bad file (data.BadFile, naming it) ends the run with that one line."""
    try:
        yield from data.read_batches(loader)
    except data.BadFile as e:
        raise SystemExit(f"error: {e}") from None


def build_model(args, tokenizer):
    task = "pretrain" if args.mode == "pretrain" else "rvos"
    freeze = {"freeze_text": args.freeze_text, "freeze_vision": args.freeze_vision}
    if args.init:
        model = slvp.load_checkpoint(args.init, task="rvos", **freeze)
        if args.fusion and args.fusion != model.fusion:
            raise ValueError(f"--fusion {args.fusion} but {args.init} was trained with fusion {model.fusion}")
        return model
    if args.encoders:  # the checkpoint's config and fusion, as --init takes them: only the decoder starts random
        with torch.random.fork_rng(devices=[]):                       # loading draws nothing from the run's seed
            src = slvp.load_checkpoint(args.encoders)
        model = slvp.SLVP(src.cfg, args.fusion or src.fusion, task, **freeze)
        model.text.load_state_dict(src.text.state_dict())
        model.vision.load_state_dict(src.vision.state_dict())
        return model
    cfg = getattr(slvp.SLVPConfig, args.config)()
    text = vision = None
    if args.t5:
        text = slvp.load_t5(args.t5)
        cfg = dataclasses.replace(cfg, **{f.name: getattr(text.cfg, f.name) for f in dataclasses.fields(cfg)
                                          if f.name.startswith("t5_") or f.name == "vocab_size"})
    else:
        cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer))
    if args.vit:
        vision = slvp.load_vit(args.vit, cfg)
        cfg = dataclasses.replace(cfg, **{f.name: getattr(vision.cfg, f.name) for f in dataclasses.fields(cfg)
                                          if f.name.startswith("vit_")})
    model = slvp.SLVP(cfg, args.fusion or "vision", task, **freeze)
    if text is not None:
        model.text.load_state_dict(text.state_dict())
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    return model



# ----------------------------------------------------------------------------------------------------------
# One training step's parts (also used by tests/gpu_check.py)
# ----------------------------------------------------------------------------------------------------------

def build_optimizer(model, args):
    """AdamW (weight decay on matrices only) with linear warm-up, then cosine to 10% of the peak, over args.steps.
    Returns (trained parameters, optimizer, scheduler)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = next(model.parameters()).is_cuda
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999),
                            fused=cuda, foreach=not cuda)    # on the CPU, foreach: the for-loop's numbers, faster
    warmup = args.warmup

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
    return trainable, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


# What stage_loss reads of a batch besides the text's ids and mask; the training loader carries nothing else (a
# synthetic pre-training clip's true flow, owner map and masks would add 1.4x its frames' bytes to each batch)
STAGE_KEYS = {"pretrain": ("frames",), "finetune": ("frames", "boxes", "masks", "valid")}


def stage_loss(model, raw, batch, device):
    """The forward pass and the loss of the stage, in bf16 autocast on CUDA: Eq. (1) in pre-training, Eqs. (5)-(7)
    in fine-tuning. `model` may be compiled or DDP-wrapped; `raw` is the SLVP inside. Returns (loss, parts)."""
    frames, ids, mask = (batch[k].to(device, non_blocking=True) for k in ("frames", "ids", "mask"))
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=frames.is_cuda):
        out = model(frames, ids, mask)    # forward(), not raw.pretrain_loss(): DDP syncs gradients only through it
    if raw.task == "pretrain":
        return slvp.photometric_objective(frames, out), {}
    boxes, masks, valid = (batch[k].to(device, non_blocking=True) for k in ("boxes", "masks", "valid"))
    num_valid = None
    if dist.is_initialized():  # average the box terms over the present frames of all processes (as DETR does)
        num_valid = valid.sum(dtype=torch.float32)
        dist.all_reduce(num_valid)
        num_valid = (num_valid / dist.get_world_size()).clamp(min=1 / dist.get_world_size())
    return raw.rvos_loss(out, boxes, masks, valid, num_valid)


def choose_tokenizer(args, sets, main_proc, ddp):
    """--spm, else the spm.model beside --init/--encoders, else (a new run) one fitted to the training texts; a resumed
    run keeps its own. Copied to --out/spm.model, beside the checkpoint."""
    start = args.init or args.encoders          # (not both): its text encoder was trained on that tokenizer's ids
    if start:  # a missing file or a folder is named as such, not by the spm.model missing beside it
        slvp.read_checkpoint_metadata(start)
    beside = Path(start).parent / "spm.model" if start else None
    spm = Path(args.spm) if args.spm else beside if beside and beside.is_file() else None
    own = args.out / "spm.model"
    if args.resume and own.is_file():   # a resumed run keeps its own tokenizer (checked before it is replaced)
        if spm is not None and spm.is_file() and spm.read_bytes() != own.read_bytes():
            fix = ("leave out --spm" if args.spm else f"it is the one beside {start}, another run's checkpoint: "
                   f"give the run's own {'--init' if args.init else '--encoders'}")
            raise ValueError(f"--resume: {spm} is not the tokenizer of the run in {args.out} ({own}); a resumed "
                             f"run keeps its own: {fix}")
        if spm is None or spm.is_file():   # (a missing --spm is named by the Tokenizer)
            spm = own
    if spm is None and start:   # a new tokenizer would give its text encoder other ids
        raise ValueError(f"no spm.model beside {start}: pass the sentencepiece model it was trained with as --spm")
    if spm is not None:
        tokenizer = slvp.Tokenizer(spm)
        if start and not args.resume:
            slvp.check_tokenizer(start, tokenizer)
        if spm.resolve() != own.resolve() and main_proc:
            shutil.copy(spm, own)
    else:
        if main_proc:
            fit_tokenizer(sets, args.out)
        if ddp:
            dist.barrier()
        tokenizer = slvp.Tokenizer(own)
    return tokenizer


def check_resume(state, args, model):
    """A resumed run must be the run in resume.pt: the same model config, task and fusion, and the same
    run_settings (a flag left out takes its default, not the run's)."""
    path = args.out / "resume.pt"
    ours = dataclasses.asdict(model.cfg)
    fields = [f"{k} {ours[k]} (was {state['config'].get(k)})" for k in ours if state["config"].get(k) != ours[k]]
    differ = [k for k, theirs, mine in (("model config", state["config"], ours),
                                        ("--mode", state["task"], model.task),
                                        ("--fusion", state["fusion"], model.fusion)) if theirs != mine]
    if differ:
        flags = lambda task, fusion: f"--mode {'finetune' if task == 'rvos' else task} --fusion {fusion}"
        raise SystemExit(f"error: {path} holds a {flags(state['task'], state['fusion'])} run of another "
                         f"{' and '.join(differ)} than this one ({flags(model.task, model.fusion)}"
                         + "; ".join(["", *fields]) + "): resume with the run's own flags")
    recorded = state.get("run", {})

    def typed(k, v, name=True):  # a setting as the command line gives it
        if isinstance(v, bool):
            return k if v else "--no-" + k[2:]
        value = "not given" if v is None else " ".join(map(str, v)) if isinstance(v, list) else v
        return f"{k} {value}" if name else value
    changed = [f"{typed(k, v)} (was {typed(k, recorded[k], isinstance(v, bool))})"
               for k, v in run_settings(args).items()
               if recorded.get(k, v) != v and not (k == "--warmup" and recorded[k] is None)]  # None: not recorded
    if changed:
        raise SystemExit(f"error: {path}: resuming with {', '.join(changed)}; a resumed run keeps the earlier "
                         f"run's data order and optimizer (start a new run to change them; a flag left out "
                         f"takes its default, not the run's: resume with the run's own flags)")


def check_same_run(args, tokenizer, state, world):
    """Under DDP every process must run the same plan: the same flags (but paths and --workers, which may differ from
    node to node), as many training clips, the same tokenizer and resume step. Otherwise the processes cut other
    permutations (clips doubled and dropped in a global batch), step at other rates, or meet their collectives at
    other steps (a --log-every or --steps of its own hung the run). Every process gathers all and stops alike."""
    local = {"data_root", "out", "spm", "init", "encoders", "t5", "vit", "workers", "steps_given", "clips"}
    mine = {"--" + k.replace("_", "-"): v for k, v in vars(args).items() if k not in local}
    mine["training clips"] = args.clips
    mine["tokenizer"] = tokenizer.digest()[:16]
    mine["resumed at step"] = None if state is None else state["step"]
    every = [None] * world
    dist.all_gather_object(every, mine)
    differ = [f"process {r}: " + ", ".join(f"{k} {theirs.get(k)} (process 0: {every[0].get(k)})"
                                           for k in sorted(set(theirs) | set(every[0]))
                                           if theirs.get(k) != every[0].get(k))
              for r, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        raise SystemExit(f"error: the processes of this run differ ({'; '.join(differ)}); give every node the same "
                         f"command line and the same data")


def optimizer_step(loss, params, opt, sched, grad_clip):
    """Backward, gradient clipping and the AdamW step. Returns False, taking no step, where the loss or the gradient
    is not finite: the weights stay those of the last good step."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(loss.detach() + norm):                      # the step's one host sync
        return False
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return True

# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1                           # launched by torchrun
    if not ddp:
        try:
            return run(args, False, 0, 1, "cuda" if torch.cuda.is_available() else "cpu")
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; a checkpoint being written is dropped whole
            resume = args.out / "resume.pt"
            how = "--resume in place of --overwrite" if args.overwrite else "--resume"
            print("stopped by Ctrl-C; " + (f"the last checkpoint is {resume}: the same command with {how} goes on "
                                           f"from it" if resume.is_file() else "no resume.pt was written yet"),
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # then die of the SIGINT, as Python does on Ctrl-C: a shell
            os.kill(os.getpid(), signal.SIGINT)           # loop running the command stops too (an exit code would not)
            raise SystemExit(130)                         # (where the signal does not end it: the shell's 130)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    error = None
    try:
        run(args, True, dist.get_rank(), dist.get_world_size(), device)
        dist.barrier()
    except SystemExit as e:  # a clear error, met by every process (the gradients are averaged: a NaN reaches all)
        error = e.code       # the exception is dropped here, and with its traceback the run's frame
    # The run's DDP model (unreachable now but for reference cycles) holds the process group: collected first, so that
    # destroy_process_group joins gloo's threads, which left running could free a task during the interpreter's exit
    # and abort it; on success and on error alike
    gc.collect()
    dist.destroy_process_group()
    if error is not None:
        raise SystemExit(error)


def run(args, ddp, rank, world, device):
    """The whole run in this process: data, tokenizer, model, optional resume, then the training loop with its
    evaluations and checkpoints."""
    main_proc = rank == 0
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} does not split over the {world} processes; "
                         f"expected a multiple of {world}")
    check_out(args)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cuda = device.startswith("cuda")

    try:
        state = read_resume(args.out / "resume.pt") if args.resume else None
        probe_cfg = getattr(slvp.SLVPConfig, args.config)()

        def build(cfg, say_notes):  # every process builds the same data: its notes are said once, by process 0
            with warnings.catch_warnings():
                if not say_notes:
                    warnings.simplefilter("ignore", data.Note)
                return build_training_data(args, cfg)
        sets = build(probe_cfg, main_proc)
        tokenizer = choose_tokenizer(args, sets, main_proc, ddp)
        model = build_model(args, tokenizer)
        if len(tokenizer) > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} pieces, more than the model's vocabulary of "
                             f"{model.cfg.vocab_size}: use the sentencepiece model the checkpoint was trained with")
        geometry = lambda c: (c.frame_size, c.num_frames)                # all the datasets read of the config
        if geometry(model.cfg) != geometry(probe_cfg):  # a checkpoint changed the geometry: rebuild the data
            sets = build(model.cfg, False)                     # (its notes were said above)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    cfg = model.cfg
    model.to(device)
    args.freeze_text, args.freeze_vision = model.freeze_text, model.freeze_vision    # the choices made, recorded
    args.clips = [len(s) for s in sets]
    if state is not None and not args.steps_given and "steps" in state:   # (not recorded up to commit 18e2ed9)
        args.steps = state["steps"]
    if state is not None and args.steps <= state["step"]:
        said = f"--steps {args.steps}" if args.steps_given else f"its {args.steps} steps (give more with --steps)"
        raise SystemExit(f"error: the run in {args.out} is at step {state['step']} already: nothing left of {said}")
    if args.warmup is not None and args.warmup > args.steps:   # checked here too: --steps left out is the run's
        raise SystemExit(f"error: --warmup {args.warmup} is longer than the run: expected at most {args.steps} steps")
    if args.warmup is None:  # 5% of the steps; a resumed run keeps its own when --steps changes
        recorded = (state or {}).get("run", {}).get("--warmup")  # None in a resume.pt written before it was recorded
        args.warmup = max(1, args.steps // 20) if recorded is None else recorded
        if args.warmup > args.steps:  # a resumed run's --steps cut below its warm-up: the rate would never peak
            raise SystemExit(f"error: --steps {args.steps} ends within the warm-up of the run in {args.out}, "
                             f"{args.warmup} steps: expected at least --steps {args.warmup}")
    if ddp:
        check_same_run(args, tokenizer, state, world)
    trainable, opt, sched = build_optimizer(model, args)

    step, epoch, batch_idx = 0, 0, 0
    if state is not None:
        check_resume(state, args, model)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, batch_idx = state["step"], state["epoch"], state["batch"]
        for group, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * f(step)            # the next step's rate on this run's schedule (--steps may change)
        torch.set_rng_state(state["rng"])
        if cuda and state["cuda_rng"]:
            restore_cuda_rng(state["cuda_rng"])
        if main_proc:
            print(f"resumed {args.out / 'resume.pt'} at step {step} (epoch {epoch}, batch {batch_idx})")

    raw = model
    if ddp:  # DDP first, then compile: the compiler splits the graph at DDP's gradient buckets
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[int(os.environ["LOCAL_RANK"])] if cuda else None)
    if args.compile:
        model = torch.compile(model)
    train_set = EpochItems(sets)
    collate = data.Collate(tokenizer, cfg.max_text_len, keys=STAGE_KEYS[args.mode])
    n_batches = len(train_set) // args.batch_size
    if n_batches == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} is more than the {len(train_set)} training clips; "
                         f"expected at most {len(train_set)}")
    if main_proc and args.resume and (args.out / "log.jsonl").is_file():
        trim_log(args.out / "log.jsonl", step)
    log = open(args.out / "log.jsonl", "a" if args.resume else "w", encoding="utf-8") if main_proc else None
    n_params = sum(p.numel() for p in raw.parameters())
    if main_proc:
        print(f"{args.mode} {raw.fusion}-as-query, {n_params / 1e6:.2f}M parameters ({sum(p.numel() for p in trainable) / 1e6:.2f}M "
              f"trained), {len(train_set)} clips, batch {args.batch_size} on {world} process(es), device {device}")
        random = [f"the {part} encoder (no --{flag})" for part, flag, frozen in
                  (("text", "t5", raw.freeze_text), ("vision", "vit", raw.freeze_vision))
                  if frozen and not (args.init or args.encoders or args.resume or getattr(args, flag))]
        if random:  # the paper freezes pre-trained encoders (Sec. 4.1); the miniature's are random (a resumed run's
            # encoders are resume.pt's, which no flag names: said at the run's start)
            print(f"note: frozen with random weights: {' and '.join(random)}", file=sys.stderr)
    peak = peak_flops() if cuda else None

    def evaluate():  # both leave the model in eval mode; the loop switches it back
        if args.mode == "pretrain":
            return evaluate_flow(raw, tokenizer, args.eval_clips, device, out=args.out)
        from eval import synthetic_scores
        return synthetic_scores(raw, tokenizer, n=args.eval_clips, device=device)

    model.train()
    t_last, steps_since = time.time(), 0
    pos = epoch * n_batches + batch_idx  # batches read so far, over the epochs: divmod gives (epoch, batch) again
    # an endless sampler: one loader, its workers started once, for the whole run; the loop stops at --steps
    batches = run_batches(len(train_set), args.batch_size, args.seed, *divmod(pos, n_batches), rank, world)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=cuda)
    if step < args.steps:  # a resumed run may have none left
        for batch in read_batches(loader):
            loss, parts = stage_loss(model, raw, batch, device)
            lr = opt.param_groups[0]["lr"]                              # this step's learning rate
            if not optimizer_step(loss, trainable, opt, sched, args.grad_clip):
                last = args.out / "ckpt.safetensors"
                what = f"loss ({loss.item()})" if not torch.isfinite(loss) else f"gradient (loss {loss.item():.4g})"
                raise SystemExit(f"error: non-finite {what} at step {step + 1}; stopping. The last good checkpoint, "
                                 f"{last if last.is_file() else 'none yet'}, is left as it was.")
            step, pos, steps_since = step + 1, pos + 1, steps_since + 1

            if step % args.log_every == 0 or step == args.steps:
                shown = torch.stack([loss.detach(), *parts.values()]).float()
                if ddp:  # the whole batch's loss and parts: the mean of the processes' (each has an equal share)
                    dist.all_reduce(shown)
                    shown /= world
                shown = dict(zip(["loss", *parts], shown.tolist()))
                if main_proc:
                    dt = (time.time() - t_last) / steps_since
                    line = {"kind": "train", "step": step, **shown, "lr": lr, "it_per_s": 1 / dt}
                    msg = f"step {step:5d} | loss {shown['loss']:.4f}"
                    msg += "".join(f" | {k} {shown[k]:.3f}" for k in parts)
                    msg += f" | lr {line['lr']:.2e} | {1 / dt:.2f} it/s"
                    if peak:
                        line["mfu"] = train_flops(raw, args.batch_size // world, batch["ids"].shape[1]) / dt / peak
                        msg += (f" | mfu {100 * line['mfu']:.1f}%"
                                f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
                    print(msg, flush=True)
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    t_last, steps_since = time.time(), 0
            if main_proc and (step % args.eval_every == 0 or step == args.steps):
                t_eval = time.time()
                scores = evaluate()
                raw.train()
                print(f"eval on {args.eval_clips} held-out synthetic clips | "            # whatever --data is
                      + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
                log.write(json.dumps({"kind": "eval", "step": step, **scores}) + "\n")
                log.flush()
                t_last += time.time() - t_eval                              # it/s counts training time only
            if main_proc and (step % args.ckpt_every == 0 or step == args.steps):
                t_save = time.time()
                save_all(args, raw, tokenizer, opt, sched, step, *divmod(pos, n_batches))
                t_last += time.time() - t_save                              # nor the checkpoints' writing
            if step >= args.steps:
                break
    if main_proc:
        print(f"done: {args.out / 'ckpt.safetensors'}")
        log.close()


if __name__ == "__main__":
    data.run_main(main)
