"""tritonbn's Triton kernels (installed as ``tritonbn.kernels``). No torch.nn in here.

forward.py: training statistics, normalisation and eval; backward.py: dgamma, dbeta, dx;
running_stats.py: the in-place running-statistics update; configs.py: every launch config
and heuristic; common.py: the statistics combine and tile shapes.
"""

from . import backward, configs, forward, running_stats

__all__ = ["backward", "configs", "forward", "running_stats"]
