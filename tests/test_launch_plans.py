"""Launch plans and their replay (tritonbn/_launch.py), and the host-cost benchmark.

Replay calls a compiled kernel directly, skipping Triton's launch path, so it must hand the
kernel exactly what that path would. On a machine without a GPU the kernels here run in the
interpreter, which compiles nothing: the replay is checked in a subprocess on
perf/mock_driver.py (kernels compile for sm_90, the launcher records its arguments), where
every replayed launch is compared with Triton's own launch for the same call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from conftest import DEVICE, random_bn_input, triton_ran

import tritonbn
from tritonbn import _launch
from tritonbn.kernels import forward as fwd_kernels

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def mock_run() -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_mock_driver_worker.py")], capture_output=True,
                          text=True, timeout=900, env=_clean_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [f"{shape}/{module}" for shape in ("one-launch", "one-launch-channels-last", "split", "split-channels-last")
         for module in ("bn", "bn-add-relu")]


@pytest.mark.parametrize("case", CASES)
def test_replay_hands_the_kernel_what_triton_would(mock_run, case):
    triton_path, replay = mock_run[case]["calls"][1:]
    assert replay["launches"], "nothing launched"
    assert replay["launches"] == triton_path["launches"]
    # The call's own tensors reach the kernels (not stale ones from the call that recorded).
    first_args = replay["launches"][0][3]
    assert first_args[0] == "x"


GN_CASES = [f"gn/{route}-{layout}/{module}" for route in ("one-launch", "split")
            for layout in ("contiguous", "channels-last") for module in ("gn", "gn-add-silu", "instance-norm")]


@pytest.mark.parametrize("case", GN_CASES)
def test_group_norm_replay_hands_the_kernel_what_triton_would(mock_run, case):
    """GroupNorm's plans (tritonbn/_group_launch.py) and InstanceNorm's running-statistics
    update replay exactly Triton's own launches, with the same count on every call."""
    run = mock_run[case]
    route = "split" if "/split-" in case else "one-launch"
    if "instance-norm" not in case:  # InstanceNorm: one channel per group, its own route choice
        assert run["route"].endswith(route)
    triton_path, replay = run["calls"][1:]
    assert replay["launches"] and replay["launches"] == triton_path["launches"]
    assert replay["launches"][0][3][0] == "x"
    assert len({call["counted"] for call in run["calls"]}) == 1
    if "instance-norm" in case:  # the update reads the call's own buffers
        assert any("running_mean" in args for _, _, _, args in replay["launches"])


def test_misaligned_input_is_never_replayed(mock_run):
    """Triton specialises pointers on 16-byte alignment: a plan made for a misaligned input
    always takes Triton's path, an aligned one replays."""
    run = mock_run["misaligned"]
    assert run["aligned"]["replayable"] == [True]
    assert run["misaligned"]["replayable"] == [False]
    assert run["aligned"]["launches"] == run["misaligned"]["launches"] == 3


def test_frozen_batch_norm_compiles_without_fma(mock_run):
    """FrozenBatchNorm2d rounds the product and the sum separately, as torchvision's two ops
    do: its normalise kernel is compiled without fp fusion (a plain BatchNorm's may fuse)."""
    ptx = mock_run["frozen_ptx"]
    assert ptx["frozen"]["fma"] == 0 and ptx["frozen"]["add"] > 0
    assert ptx["plain"]["fma"] > 0  # the check can see an fma where there is one


@pytest.mark.parametrize("case", CASES)
def test_launches_per_training_step(mock_run, case):
    """One forward and one backward launch on the one-launch route, three each on the split
    route: the running statistics are updated inside the last forward kernel."""
    run = mock_run[case]
    expected = 2 if run["route"].endswith("one-launch") else 6
    assert [call["counted"] for call in run["calls"]] == [expected] * 3
    assert len(run["calls"][2]["launches"]) == expected
    updating = [name for name, _, _, args in run["calls"][2]["launches"]
                if "running_mean" in args and "running_var" in args]
    # The one-launch kernel, or the split route's combine kernel, and nothing else.
    layout = run["route"].split("-")[0]
    assert updating == (["_bn_fwd_combine"] if run["route"].endswith("split") else [f"_bn_fwd_one_launch_{layout}"])


def test_host_cost_benchmark_runs():
    """The benchmark's structure on a few rounds (it asserts no time: times are for perf/)."""
    proc = subprocess.run([sys.executable, "-m", "perf.host_cost", "--rounds", "1", "--steps", "1", "--json", "-"],
                          capture_output=True, text=True, timeout=900, env=_clean_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "mock Triton driver" in out and "stubbed" in out
    rows = json.loads(out.strip().splitlines()[-1])
    names = {row["case"] for row in rows}
    for expected in ("BatchNorm2d train one-launch contiguous", "BatchNorm2d eval split channels_last",
                     "BN+add+ReLU train split contiguous", "SyncBatchNorm (no group) train one-launch contiguous"):
        assert expected in names
    for row in rows:
        assert row["tritonbn_us"] > 0 and row["torch_us"] > 0
        assert row["launches_fwd"] >= 1  # tritonbn's kernels ran, not a fallback
        if row["launch_target"] is None:  # GroupNorm: launches reported, no budget set
            continue
        forward_budget, backward_budget = row["launch_target"]
        assert row["launches_fwd"] <= forward_budget
        assert row["launches_bwd"] is None or row["launches_bwd"] <= backward_budget
    assert "| case |" in out


def test_tuning_never_applies_the_running_update_twice(monkeypatch, tmp_path):
    """A one-launch kernel that updates the running statistics is tuned on its variant without
    the update: with two configs and a benchmark that runs each, the buffers move once."""
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path))
    tuner = fwd_kernels._bn_fwd_one_launch_ncs
    runs = []

    def bench(kernel_call, quantiles=None, **kwargs):
        kernel_call()
        runs.append(1)
        return [float(len(runs))] * 3

    base = tuner.configs[0]
    monkeypatch.setattr(tuner, "configs", [base, triton.Config(dict(base.kwargs), num_warps=8)])
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(tuner, "use_disk", False)  # the interpreter's kernels have no compiled identity
    monkeypatch.setitem(tuner.__dict__, "do_bench", bench)  # a cached_property: no getattr first
    monkeypatch.setattr(_launch, "_forward_plans", {})
    shape = (3, 5, 6, 7)
    assert _launch.route(random_bn_input(shape)) == "ncs-one-launch"
    ours = tritonbn.BatchNorm2d(5).to(DEVICE)
    ref = torch.nn.BatchNorm2d(5).to(DEVICE)
    x = random_bn_input(shape)
    with triton_ran():
        ours(x)
    ref(x)
    assert len(runs) == 2, "both configs should have been benchmarked"
    assert int(ours.num_batches_tracked) == 1, "the kernel counts the batch once, not per trial"
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    ours(x)  # tuned now: one launch with the update
    ref(x)
    assert len(runs) == 2
    assert int(ours.num_batches_tracked) == 2
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
