"""The perf report's GroupNorm part runs end to end (structure only: times are for perf/).

A subprocess runs ``perf.report`` on the smallest GroupNorm smoke shape, both layouts, every
training mode, tritonbn and eager torch: each tritonbn row must carry a passing correctness
check (tritonbn against eager torch, decided in the report) and a route, each row a time,
and the summary must hold the GroupNorm table. torch.compile, plots and the host-cost
section are left out to keep it short (tests/test_launch_plans.py runs the host-cost one).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU report is run by perf/gpu_run.sh, not the tests")
def test_group_norm_report_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITONBN_CACHE_DIR": str(tmp_path / "tuning")}
    proc = subprocess.run(
        [sys.executable, "-m", "perf.report", "--ops", "group_norm", "gn_silu", "--shapes", "smoke-gn-2x8",
         "--providers", "tritonbn", "torch", "--dtypes", "float32", "--no-plot", "--no-host-cost",
         "--no-model-step", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["provider"] != "copy"]
    seen = {(r["op"], r["provider"], r["mode"], r["layout"]) for r in rows}
    expected = {(op, provider, mode, layout) for op in ("group_norm", "gn_silu") for provider in ("tritonbn", "torch")
                for mode in ("forward-train", "backward", "forward+backward")
                for layout in ("contiguous", "channels_last")}
    assert seen == expected
    for row in rows:
        assert float(row["ms_p50"]) > 0 and int(row["bytes_model"]) > 0
        if row["provider"] == "tritonbn":
            assert row["check"] == "ok", row
            assert row["route"], row
    assert "GroupNorm: tritonbn GroupNorm / GroupNormAct" in proc.stdout
    assert "INTERPRETER SMOKE RUN" in proc.stdout


def test_group_norm_smoke_suite_takes_both_routes():
    """The smoke run must exercise the split route too, in both layouts, not only the tiny shapes' one."""
    sys.path.insert(0, str(ROOT))
    from perf import shapes
    from tritonbn import _group_launch

    routes = set()
    for case in shapes.smoke_group_norm_suite():
        x = torch.randn(case.shape)
        routes.add(_group_launch.route(x, case.groups))
        routes.add(_group_launch.route(x.contiguous(memory_format=torch.channels_last), case.groups))
    assert routes == {"ncs-one-launch", "ncs-split", "rows-one-launch", "rows-split"}
