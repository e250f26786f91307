"""perf/model_step.py without a GPU: the skip path, the case plan, and the CSV and table builders.

The builders are fed fabricated measurements through ``make_row`` (the same function the
benchmark uses), so these tests check structure only, never times.
"""

import argparse
import csv
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perf import common, model_step  # noqa: E402
from perf.model_step import Case, Measured  # noqa: E402

ENV = {"device": "NVIDIA H200", "driver": "580.00", "cuda": "13.0", "torch": "2.9.0", "triton": "3.6.0",
       "date": "2026-12-03T08:00:00+00:00", "label": common.MEASUREMENT_LABEL}


def fabricated_rows() -> list[dict]:
    """One row per default case at batch 32, with made-up but plausible numbers."""
    rows = []
    for i, case in enumerate(model_step.plan(batches=(32,))):
        measured = Measured(ms=(10.0 + i, 11.0 + i, 12.0 + i), peak_mem_mb=5000.0 + i, steps=20,
                            compile_s=40.0 if case.mode == "compile" else math.nan, first_step_s=2.0,
                            loss_diff=0.0 if case.provider == "torch" else 1e-4,
                            check="reference" if (case.provider, case.mode) == ("torch", "eager") else "ok",
                            backend="cudnn", bn_modules="torch.BatchNorm2d x53", bn_count=53)
        rows.append(model_step.make_row(case, measured, ENV))
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is the CPU path")
def test_skips_without_cuda(capsys):
    assert model_step.run(60.0, None) == []
    assert model_step.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [model_step.SKIP_NO_CUDA] * 2


def test_skips_without_torchvision(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    # The debug device, so that the CUDA check passes on any machine and the torchvision one decides.
    assert model_step.run(60.0, tmp_path / "rows.csv", device="cpu") == []
    assert "SKIPPED (torchvision is not importable" in capsys.readouterr().out
    assert not (tmp_path / "rows.csv").exists()


def test_report_hook_on_cpu_says_skipped(capsys, tmp_path):
    env = argparse.Namespace(cuda=False)
    args = argparse.Namespace(model_step=None, time_budget=0.0, resume=False)
    issues: list[str] = []
    lines = model_step.report_section(env, args, 0.0, tmp_path, issues)
    assert model_step.SKIP_NO_CUDA in lines
    assert model_step.SKIP_NO_CUDA in capsys.readouterr().out
    assert issues == []


def test_report_hook_off_says_so(tmp_path):
    env = argparse.Namespace(cuda=True)
    args = argparse.Namespace(model_step=False, time_budget=0.0, resume=False)
    lines = model_step.report_section(env, args, 0.0, tmp_path, [])
    assert any("not run (--no-model-step" in line for line in lines)
    assert not (tmp_path / "model_step.csv").exists()


def test_plan_order_and_variants():
    cases = model_step.plan()
    # 2 batches x 2 precisions x (3 models x 2 modes + 2 graphs).
    assert len(cases) == 2 * 2 * 8
    assert len(set(cases)) == len(cases)
    first = cases[:3]
    assert [c.provider for c in first] == ["torch", "convert", "fuse"]
    assert {(c.batch, c.precision, c.mode) for c in first} == {(32, "bfloat16", "eager")}
    assert [(c.precision, c.mode) for c in cases[3:12:3]] == [("float32", "eager"), ("bfloat16", "compile"),
                                                             ("float32", "compile")]
    assert cases[12].batch == 128 and cases[12].mode == "eager"
    graphs = [c for c in cases if c.mode == "graph"]
    assert cases[-len(graphs):] == graphs  # graphs last
    assert {c.provider for c in graphs} == {"torch", "convert"}
    assert model_step.plan(batches=(32,), variants=["fuse-graph"]) == [
        Case(32, "bfloat16", "fuse", "graph"), Case(32, "float32", "fuse", "graph")]
    with pytest.raises(ValueError):
        model_step.plan(variants=["nope-eager"])


def test_rows_and_csv_structure(tmp_path):
    rows = fabricated_rows()
    assert len(rows) == 16  # batch 32: 2 precisions x (3 models x 2 modes + 2 graphs)
    for row in rows:
        assert tuple(row) == model_step.CSV_COLUMNS
        assert model_step.CSV_COLUMNS[:len(common.COLUMNS)] == common.COLUMNS
        assert row["op"] == "resnet50_step"
        assert row["provider"] in model_step.PROVIDERS.values()
        assert row["mode"] in model_step.MODES.values()
        assert (row["dtype"], row["layout"]) in {("float32", "contiguous"), ("bfloat16", "channels_last")}
        assert row["shape"] == "32x3x224x224" and row["shape_name"] == "resnet50-b32"
        assert row["device"] == ENV["device"] and row["triton"] == ENV["triton"]
        assert float(row["ms_p20"]) <= float(row["ms_p50"]) <= float(row["ms_p80"])
        assert math.isclose(float(row["images_per_s"]), 32 / (float(row["ms_p50"]) * 1e-3), rel_tol=1e-3)
        assert bool(row["compile_s"]) == (row["mode"] == "torch.compile")
        assert row["gbps"] == "" and row["bytes_model"] == ""  # no bytes model for a whole step
    path = tmp_path / "model_step.csv"
    model_step.write_rows(path, rows[:5])
    model_step.write_rows(path, rows[5:])  # appends, one header
    with open(path, newline="", encoding="utf-8") as f:
        header, *body = list(csv.reader(f))
    assert header == list(model_step.CSV_COLUMNS)
    assert len(body) == len(rows)
    assert model_step.read_rows(path) == rows


def test_summary_table_structure():
    rows = fabricated_rows()
    # A resumed CSV appends: the later row of a case replaces the earlier one in the table.
    again = dict(rows[1], ms_p50="5.0000", check="MISMATCH: loss")
    text = model_step.summary_table([*rows, again])
    lines = text.splitlines()
    assert lines[0].startswith("### Model-level: resnet50_step") and "NVIDIA H200" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    header, rule, *body = table
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["batch", "precision", "mode", "model", "step ms (p50)", "p20-p80 ms", "images/s", "vs torch",
                       "peak MiB", "compile s", "check"]
    assert len(rule.strip("|").split("|")) == len(columns)
    assert len(body) == len(rows)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    assert all(len(c) == len(columns) for c in cells)
    # Plan order: eager bf16 torch, convert, fuse first; graphs last; torch is 1.00x of itself.
    assert [c[3] for c in cells[:3]] == list(model_step.PROVIDERS.values())
    assert {c[1] for c in cells[:3]} == {"bf16 autocast channels_last"} and cells[0][7] == "1.00x"
    assert all(c[2] == "cuda-graph" for c in cells[-4:])
    assert cells[1][4] == "5.00" and cells[1][10] == "MISMATCH: loss"
    assert all(c[9] != "-" for c in cells if c[2] == "torch.compile")
    assert model_step.summary_table([]) == "model-level benchmark: no rows"


def test_budget_spent_skips_every_case(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(model_step, "torchvision_missing", lambda: None)  # no model is built here
    assert model_step.run(0.0, tmp_path / "rows.csv", device="cpu", batches=(32,)) == []
    out = capsys.readouterr().out
    assert "CUDA-graph cases need CUDA, not run" in out  # the debug device has no graphs
    assert "spent: 12 case(s) not run" in out  # 16 at batch 32, less the 4 graphs
    assert not (tmp_path / "rows.csv").exists()


def test_resume_skips_cases_in_the_csv(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(model_step, "torchvision_missing", lambda: None)
    path = tmp_path / "model_step.csv"
    model_step.write_rows(path, [r for r in fabricated_rows() if r["mode"] != "cuda-graph"])
    assert model_step.run(1e6, path, device="cpu", batches=(32,), env=ENV, resume=True) == []
    out = capsys.readouterr().out
    assert "12 case(s) already in" in out and "nothing to run" in out
