"""Test set-up shared by the whole suite.

The same tests run on CUDA when a GPU is present (that is the GPU CI) and otherwise on the
CPU through Triton's interpreter. TRITON_INTERPRET is read when @triton.jit runs, so it is
set here, before anything imports tritonbn.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# A private inductor cache per test session: torch's compiled-graph caches do not key on a
# custom op's schema, so graphs compiled against an older tritonbn would be replayed.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tritonbn-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import contextlib  # noqa: E402

import pytest  # noqa: E402

import tritonbn  # noqa: E402
from tritonbn import _launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    # References (convolutions, linear layers in the model tests) in true float32, as on CPU:
    # TF32 would put 1e-3 errors into the torch side of every comparison.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

# (dtype, atol, rtol) for outputs normalised to O(1). float32: a few ulps of reduction
# error over up to ~1e5 elements. float16/bfloat16: the output's own rounding (2^-11 and
# 2^-8 relative) dominates; torch itself rounds there too, so we allow about twice that.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


@pytest.fixture
def device() -> str:
    return DEVICE


@contextlib.contextmanager
def triton_ran(min_launches: int = 1):
    """Fail unless tritonbn's kernels ran inside the block (no silent fallback to torch)."""
    before = _launch.launch_count
    yield
    launched = _launch.launch_count - before
    assert launched >= min_launches, f"expected tritonbn kernels to run, {launched} launches seen"


@pytest.fixture(autouse=True)
def _never_torch_native():
    probe = torch.empty(0, device=DEVICE)
    assert tritonbn.backend_for(probe) != "torch-native", "tests must exercise the Triton kernels"
    yield


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Fill every kernel output with NaN before the kernel runs: an unwritten element shows."""
    _launch.poison_outputs = True
    yield
    _launch.poison_outputs = False


def randomize_batch_norm(module, batches: int = 5):
    """Non-trivial parameters and buffers (never the constructor's ones and zeros)."""
    with torch.no_grad():
        if module.affine:
            module.weight.uniform_(0.5, 1.5)
            if module.bias is not None:  # torch 2.13's bias=False
                module.bias.normal_()
        if module.track_running_stats:
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(batches)
    return module


def random_bn_input(shape, dtype=torch.float32, device=DEVICE, memory_format=None):
    """Per-channel means and scales far from 0 and 1, so that a wrong statistic shows."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    offsets = torch.randn(c, dtype=torch.float64) * 3.0
    scales = torch.rand(c, dtype=torch.float64) * 2.0 + 0.5
    x = (torch.randn(shape, dtype=torch.float64) * scales.view(view) + offsets.view(view)).to(device, dtype)
    return x.contiguous(memory_format=memory_format) if memory_format is not None else x


class _NoBatchNormMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises on any batch-norm op but tritonbn's own (forward or backward) that reaches the dispatcher."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "tritonbn" and "batch_norm" in func.name():
            raise AssertionError(f"torch's own batch norm ran: {func.name()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_torch_batch_norm():
    """Fail if torch's own batch norm runs inside the block, forward or backward.

    Two nets: ``torch.batch_norm`` / ``F.batch_norm`` (and the functional's module-level
    name) are patched to raise, which also catches a path that would be decomposed before
    the dispatcher; and a dispatch mode raises on every aten op whose name contains
    "batch_norm" (native_batch_norm, _native_batch_norm_legit*, cudnn_batch_norm, their
    backwards), which autograd's engine also runs under. tritonbn's own CPU fallback and
    double-backward path call F.batch_norm, so scope the block to a converted model's step.
    """
    import torch.nn.functional as F

    def refuse(*args, **kwargs):
        raise AssertionError("torch's own batch norm ran: F.batch_norm / torch.batch_norm")

    saved = (F.batch_norm, torch.batch_norm)
    F.batch_norm = refuse
    torch.batch_norm = refuse
    try:
        with _NoBatchNormMode():
            yield
    finally:
        F.batch_norm, torch.batch_norm = saved
