"""A Triton driver for machines without a GPU: kernels compile for real, launches do nothing.

Host cost (the CPU time a training step spends in Python before the GPU sees a kernel) can
be measured on a CPU-only machine only if Triton's own launch path runs: argument binding,
specialisation, the kernel cache, the autotuner. This driver makes Triton believe it has
one sm_90 device:

* compiling is real (``triton.compile`` to PTX and cubin, on disk in Triton's cache);
* ``load_binary`` returns dummy handles (nothing is loaded: there is no device);
* the launcher is a Python callable that takes the launch arguments and returns: the C
  launcher it replaces reads the same arguments (pointers, scalars) in compiled code, so a
  real launch costs a few microseconds more than this one;
* the benchmarker (autotuning) calls the kernel once and reports the config's index in the
  list as its time, so the first config always wins, deterministically.

Tensors are torch CPU tensors: tritonbn is told to take its Triton path for them
(``tritonbn.backend``'s mock switch), and no kernel ever touches their memory, so outputs
hold garbage. This is for timing the host only.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

STUBBED = ("module loading (dummy handles)", "the C launcher (a Python no-op)", "benchmarking (first config wins)")


class _Utils:
    """The part of CudaUtils that Triton's runtime calls."""

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 32, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "mem_clock_rate": 2_619_000,
                "mem_bus_width": 5120, "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1_980_000}


class _NoOpLauncher:
    def __init__(self, src, metadata):
        self.name = getattr(metadata, "name", "kernel")

    def __call__(self, *args):
        return None


def _bench_first_config_wins(kernel_call, quantiles=None, **kwargs):
    kernel_call()  # run once, as a real benchmark would (compiles the config)
    _bench_first_config_wins.calls += 1
    return [float(_bench_first_config_wins.calls)] * (len(quantiles) if quantiles else 1)


_bench_first_config_wins.calls = 0


class MockCudaDriver(DriverBase):
    """One sm_90 device, device 0, stream 0; see the module docstring."""

    def __init__(self, arch: int = 90) -> None:
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils()
        self.launcher_cls = _NoOpLauncher

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.target.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        return _bench_first_config_wins

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        return None

    def clear_cache(self, cache) -> None:
        pass


def install(arch: int = 90) -> MockCudaDriver:
    """Make the mock driver Triton's active one, and tritonbn's Triton path take CPU tensors.

    Call before tritonbn is imported (TRITON_INTERPRET must not be set: the interpreter
    would run the kernels instead).
    """
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the mock driver measures the compiled launch path: unset TRITON_INTERPRET")
    driver = MockCudaDriver(arch)
    triton.runtime.driver.set_active(driver)
    os.environ["TRITONBN_MOCK_DRIVER"] = "1"
    return driver
