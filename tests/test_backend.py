"""Dispatch: which implementation runs, no host synchronisation, one running-stat update."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, triton_ran
from torch.utils._python_dispatch import TorchDispatchMode

import tritonbn
from tritonbn import _launch

# Ops that read a device value back to the host.
_SYNCING_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::equal", "aten::is_nonzero"}


class _HostSyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNCING_OPS:
            self.seen.append(name)
        if name == "aten::_to_copy" and kwargs and str(kwargs.get("device", "")).startswith("cpu"):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_backend_is_visible():
    expected = "triton" if DEVICE == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" else "triton-interpreter"
    assert tritonbn.backend_for(torch.empty(1, device=DEVICE)) == expected


@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_host_sync_in_training_step(momentum):
    bn = tritonbn.BatchNorm2d(4, momentum=momentum).to(DEVICE)
    x = torch.randn(3, 4, 5, 5, device=DEVICE, requires_grad=True)
    bn(x).sum().backward()  # first call of a shape may autotune (which synchronises)
    detector = _HostSyncDetector()
    with detector, triton_ran():
        y = bn(x)
        y.backward(torch.randn_like(y))
    assert detector.seen == []
    bn.eval()
    with detector, triton_ran():
        bn(x).backward(torch.randn_like(x))
    assert detector.seen == []


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode needs a GPU")
def test_no_host_sync_cuda_debug_mode():
    bn = tritonbn.BatchNorm2d(8, momentum=None).cuda()
    x = torch.randn(4, 8, 9, 9, device="cuda", requires_grad=True)
    bn(x).sum().backward()  # tune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = bn(x)
        y.backward(torch.randn_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape,launches", [((4, 3, 6, 6), 1), ((2, 3, 160, 160), 3)], ids=["one-launch", "split"])
def test_running_stats_updated_inside_the_forward_launches(shape, launches):
    """The running-statistics update is folded into the last forward kernel: a training
    forward is one launch on the one-launch route, three on the split route, and the buffers
    follow torch's."""
    bn = tritonbn.BatchNorm2d(3).to(DEVICE)
    ref = torch.nn.BatchNorm2d(3).to(DEVICE)
    assert _launch.route(torch.empty(shape, device=DEVICE)).endswith("one-launch" if launches == 1 else "split")
    for _ in range(3):
        x = torch.randn(shape, device=DEVICE) * 2 + 1
        before = _launch.launch_count
        bn(x)
        assert _launch.launch_count - before == launches
        ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_cpu_without_interpreter_falls_back_to_torch():
    # A fresh process without TRITON_INTERPRET: CPU tensors use torch's own batch norm.
    code = textwrap.dedent("""
        import torch, tritonbn
        x = torch.randn(4, 3, 5, 5)
        assert tritonbn.backend_for(x) == "torch-native", tritonbn.backend_for(x)
        ours, ref = tritonbn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
        for _ in range(2):
            torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
        from tritonbn import _launch
        assert _launch.launch_count == 0
        print("fallback ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
