"""Tuned launch configs on disk, so that a later process does not tune the same shape again.

Triton's own ``cache_results`` crashes on a corrupt file; this cache warns, deletes the file
and tunes again, then rewrites it. One JSON file per kernel and fingerprint:

    <dir>/<kernel>-<fingerprint>.json    {"version": 1, "entries": {"<tuning key>": <config index>}}

The fingerprint covers the kernel's source, the Triton version, the GPU target and the config
list, so a file never applies to a changed kernel, another card or another config set (stale
entries are simply never looked up). The directory is ``$TRITONBN_CACHE_DIR``, else
``~/.cache/tritonbn/autotune``. Writes go through a temporary file and an atomic rename, so a
reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import triton
from triton.runtime.autotuner import Autotuner

FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("TRITONBN_CACHE_DIR", Path.home() / ".cache" / "tritonbn" / "autotune"))


def load_entry(path: Path, key: str, num_configs: int) -> int | None:
    """The tuned config index for key, or None. A corrupt file is deleted with a warning."""
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != FORMAT_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError("unknown format")
        index = data["entries"].get(key)
        if index is None:
            return None
        if not isinstance(index, int) or not 0 <= index < num_configs:
            raise ValueError(f"config index {index!r} out of range")
        return index
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as error:
        warnings.warn(f"tritonbn: ignoring the corrupt autotune cache {path} ({error}); tuning again", stacklevel=2)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def store_entry(path: Path, key: str, index: int) -> None:
    """Add key -> index to the file (created if needed), atomically; errors only warn."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {}
        if path.exists():
            try:
                entries = json.loads(path.read_text()).get("entries", {})
                entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError, AttributeError):
                entries = {}
        entries[key] = index
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": FORMAT_VERSION, "entries": entries}, f)
        os.replace(tmp, path)
    except OSError as error:
        warnings.warn(f"tritonbn: could not write the autotune cache {path} ({error})", stacklevel=2)


def _target_name() -> str:
    try:
        target = triton.runtime.driver.active.get_current_target()
        return f"{target.backend}-{target.arch}-{target.warp_size}"
    except Exception:  # no driver (interpreter): nothing is tuned there anyway
        return "none"


class DiskCachedAutotuner(Autotuner):
    """triton.autotune's Autotuner, with tuned configs read from and written to disk (unless
    ``use_disk`` is False), one tuning at a time per kernel, no tuning inside a CUDA graph
    capture, fixed configs for reductions under torch.use_deterministic_algorithms, and
    in-place effects (``in_place_flag``) kept out of every trial run."""

    def _tuning_key(self, args, kwargs):
        # The same key as Autotuner.run builds (Triton 3.6 to 3.9): key args, then tensor dtypes.
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)

    def _cache_path(self) -> Path:
        fn = self.fn
        while not hasattr(fn, "cache_key"):
            fn = fn.fn
        fingerprint = hashlib.sha256("|".join([
            triton.__version__, fn.cache_key, _target_name(), repr([str(c) for c in self.configs]),
        ]).encode()).hexdigest()[:24]
        return cache_dir() / f"{fn.__name__}-{fingerprint}.json"

    use_disk = True
    # Reductions give the same bits under every config by construction (kernels/common.py);
    # with torch's deterministic mode on they also run their default config, so that not even
    # the choice of compiled variant depends on timings.
    reduces = False

    # The name of a constexpr that switches on an in-place side effect (the running-statistics
    # update), or None. Trial runs never have it on: a new key is tuned on the variant without
    # the effect, then the chosen config runs once with it.
    in_place_flag: str | None = None

    def run(self, *args, **kwargs):
        if len(self.configs) < 2:
            return super().run(*args, **kwargs)
        if self.reduces and _torch_deterministic():
            return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())
        key = self._tuning_key(args, kwargs)
        if key in self.cache:  # the common case: no lock, no file
            return super().run(*args, **kwargs)
        if _capturing_cuda_graph():
            # Benchmarking synchronises, which a graph capture forbids: run the default config
            # untuned (and remember nothing); tuning happens on the next call outside capture.
            return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())
        # Autotuner.run keeps per-call state on the shared object (self.nargs): one tuning at
        # a time per kernel, so threads tuning a new shape at once do not trample each other.
        with self._tuning_lock():
            if key not in self.cache:
                launched, result = self._tune(key, args, kwargs)
                if launched:
                    return result
            return super().run(*args, **kwargs)

    def _tune(self, key, args, kwargs) -> tuple[bool, object]:
        """Fill self.cache[key]: from disk, or by benchmarking (without in-place effects).

        Returns (True, its result) when tuning ended with the caller's own launch (Autotuner.run
        benchmarks every config, then launches the best once with the arguments it was given),
        (False, None) when the caller's launch is still to be made.
        """
        text_key = repr(tuple(str(k) for k in key))
        if self.use_disk:
            index = load_entry(self._cache_path(), text_key, len(self.configs))
            if index is not None:
                self.cache[key] = self.configs[index]
                return False, None
        in_place = self.in_place_flag is not None and kwargs.get(self.in_place_flag)
        # With an in-place effect, the trials (and the launch that ends them) run the variant
        # without it: outputs are written, and rewritten by the caller's launch; in-place
        # buffers are never touched.
        trial_kwargs = {**kwargs, self.in_place_flag: False} if in_place else kwargs
        result = super().run(*args, **trial_kwargs)
        if self.use_disk and key in self.cache:
            store_entry(self._cache_path(), text_key, self.configs.index(self.cache[key]))
        return not in_place, result

    def _tuning_lock(self) -> threading.Lock:
        with _LOCKS_GUARD:
            if not hasattr(self, "_lock"):
                self._lock = threading.Lock()
            return self._lock


_LOCKS_GUARD = threading.Lock()


def _capturing_cuda_graph() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:
        return False


def _torch_deterministic() -> bool:
    try:
        import torch

        return torch.are_deterministic_algorithms_enabled()
    except Exception:
        return False
