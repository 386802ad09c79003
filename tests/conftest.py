import glob
import importlib.util
import os
import sys

# Triton reads TRITON_INTERPRET when it is imported: with it, the kernels run on CPU tensors (SPEC §2).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _register_torchvision_ops():
    """timm and open_clip import torchvision, whose only build for torch 2.13 is CUDA-linked: on a CPU torch its
    C library fails to load and the import dies on `torchvision::nms does not exist`. Define the two ops its meta
    registrations look up, only when the real library cannot be loaded (SPEC §2)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    for so in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(so)
            return
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _register_torchvision_ops.lib = lib  # keep the registration alive


_register_torchvision_ops()
