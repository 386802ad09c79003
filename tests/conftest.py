import glob
import importlib.util
import os
import sys

# Triton reads TRITON_INTERPRET when it is imported: with it, the kernels run on CPU tensors (SPEC §2).
os.environ.setdefault("TRITON_INTERPRET", "1")
# The README runs the suite in two pytest-xdist workers (`-n 2`) on a 2-core machine: each runs torch on one thread,
# as the tests' training subprocesses do (test_train.ENV). Two threads each ran the whole suite slower than one process.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
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


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A small sentencepiece model with T5's conventions (<pad>=0, </s>=1, <unk>=2, no BOS), trained here."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("spm")
    sentences = [f"the {c} {k} moves {m} while a {s} shape falls" for c in ("red", "blue", "green", "yellow")
                 for k in ("circle", "square", "triangle") for m in ("left", "right", "up", "down")
                 for s in ("small", "large")]
    (d / "text.txt").write_text("\n".join(sentences))
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "sp"), vocab_size=40,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2)
    return d / "sp.model"


def pytest_collection_modifyitems(items):
    """The learning test (a third of the suite's time) first, so that under `-n 2 --dist worksteal` one worker runs it
    while the other takes the rest of the suite, the tests queued behind it included."""
    items.sort(key=lambda item: item.name != "test_short_pretraining_learns_motion")
