"""The on-disk autotune cache (kernels/tuning_cache.py): reuse across processes, and a corrupt
or stale file is ignored with a warning, then rebuilt, never a crash."""

import json

import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner

from tritonbn.kernels import tuning_cache


def test_store_then_load(tmp_path):
    path = tmp_path / "k.json"
    tuning_cache.store_entry(path, "('64', '128')", 2)
    tuning_cache.store_entry(path, "('8', '16')", 0)
    assert tuning_cache.load_entry(path, "('64', '128')", num_configs=4) == 2
    assert tuning_cache.load_entry(path, "('8', '16')", num_configs=4) == 0
    assert tuning_cache.load_entry(path, "('1', '1')", num_configs=4) is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "entries": {}}),
                                     json.dumps({"version": 1, "entries": {"k": 7}}),
                                     json.dumps({"version": 1, "entries": {"k": "x"}}), json.dumps([1, 2])],
                         ids=["truncated", "other-version", "index-out-of-range", "index-not-int", "not-a-dict"])
def test_corrupt_file_warns_is_deleted_and_rebuilt(tmp_path, content):
    path = tmp_path / "k.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match="corrupt autotune cache"):
        assert tuning_cache.load_entry(path, "k", num_configs=4) is None
    assert not path.exists()
    tuning_cache.store_entry(path, "k", 1)
    assert tuning_cache.load_entry(path, "k", num_configs=4) == 1


def _fake_tuner(monkeypatch, tmp_path, configs, benched):
    """A DiskCachedAutotuner around a trivial function, with Triton's tuning replaced by a
    stand-in (the interpreter cannot benchmark) that records each benchmark and picks configs[1]."""
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path))

    def fake_run(self, *args, **kwargs):
        key = self._tuning_key(args, kwargs)
        if key not in self.cache:
            benched.append(key)
            self.cache[key] = self.configs[1]
        return self.cache[key]

    monkeypatch.setattr(Autotuner, "run", fake_run)

    class FakeFn:
        __name__ = "fake_kernel"
        cache_key = "source-hash"

    tuner = tuning_cache.DiskCachedAutotuner.__new__(tuning_cache.DiskCachedAutotuner)
    tuner.fn, tuner.configs, tuner.keys, tuner.arg_names, tuner.cache = FakeFn(), configs, ["n"], ["x", "n"], {}
    return tuner


def test_second_process_reuses_tuned_config(monkeypatch, tmp_path):
    configs = [triton.Config({"TILE": t}) for t in (1024, 2048, 4096)]
    benched = []
    first = _fake_tuner(monkeypatch, tmp_path, configs, benched)
    x = torch.empty(4)
    assert first.run(x, 4096) is configs[1]
    assert len(benched) == 1
    second = _fake_tuner(monkeypatch, tmp_path, configs, benched)  # a fresh in-memory cache
    assert second.run(x, 4096) is configs[1]
    assert len(benched) == 1, "the tuned config must come from disk, not a new benchmark"
    assert second.run(x, 8192) is configs[1]
    assert len(benched) == 2  # a new shape bucket tunes


def test_corrupt_file_during_run_retunes(monkeypatch, tmp_path):
    configs = [triton.Config({"TILE": t}) for t in (1024, 2048)]
    benched = []
    tuner = _fake_tuner(monkeypatch, tmp_path, configs, benched)
    tuner.run(torch.empty(2), 16)
    path = tuner._cache_path()
    path.write_text("garbage")
    fresh = _fake_tuner(monkeypatch, tmp_path, configs, benched)
    with pytest.warns(UserWarning, match="corrupt"):
        assert fresh.run(torch.empty(2), 16) is configs[1]
    assert len(benched) == 2
    assert tuning_cache.load_entry(path, repr(tuple(str(k) for k in fresh._tuning_key((torch.empty(2), 16), {}))),
                                   num_configs=2) == 1


def test_reductions_use_the_default_config_in_deterministic_mode(monkeypatch, tmp_path):
    configs = [triton.Config({"TILE": t}) for t in (1024, 2048)]
    benched = []
    tuner = _fake_tuner(monkeypatch, tmp_path, configs, benched)
    launched = []

    class Kernel:
        __name__ = "fake_reduction"
        cache_key = "source-hash"

        def run(self, *args, **kwargs):
            launched.append(kwargs["TILE"])

    tuner.fn = Kernel()
    tuner.reduces = True
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tuner.run(torch.empty(2), 64)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert launched == [1024] and benched == [], "a reduction must not be tuned in deterministic mode"
    tuner.run(torch.empty(2), 64)
    assert len(benched) == 1  # outside deterministic mode it tunes as usual
