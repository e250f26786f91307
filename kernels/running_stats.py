"""Running-statistics update, on device, once per training forward.

    factor       = momentum, or 1 / num_batches_tracked when momentum is None (cumulative
                   average; the counter is read on device, so no host synchronisation)
    running_mean = (1 - factor) * running_mean + factor * mean
    running_var  = (1 - factor) * running_var  + factor * var * M / (M - 1)   (unbiased)

M is the batch's element count per channel: a host number, or (SyncBatchNorm, where other
processes' batch sizes are only known on the device) a per-channel device tensor.

The update is folded into the last kernel of a training forward (the one-launch kernels and
the split route's combine kernel) through ``blend_running_stats``, behind an UPDATE_RUNNING
constexpr; this standalone kernel serves SyncBatchNorm (whose count is on the device) and
running buffers that are not contiguous. A tuned kernel with the update is only ever tuned
with UPDATE_RUNNING off (kernels/tuning_cache.py): trial runs never apply it.

With COUNT_BATCH the same kernel also counts the batch (num_batches_tracked += 1, program 0),
which torch's module does with a separate ``add_``: one op dispatch (and on a GPU one launch)
less per training step. Only with a fixed momentum: a cumulative average reads the counter in
every program, which a write by program 0 could overtake, so there the host counts first.
"""

import triton
import triton.language as tl

from .common import CALLER_RUNNING, exact_scalar


@triton.jit
def blend_running_stats(RunningMean, RunningVar, NumBatchesTracked, c, c_mask, mean, var,
                        momentum, momentum_lo, bessel, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
                        COUNT_BATCH: tl.constexpr = False, first_program=False):
    """The update of channels c (mean, var: ACC values); bessel: M / (M - 1), as ACC values.
    COUNT_BATCH: first_program (one program of the grid) adds 1 to the counter."""
    tl.static_assert(not (CUMULATIVE and COUNT_BATCH), "a cumulative average is counted by the host")
    if COUNT_BATCH:
        if first_program:
            tl.store(NumBatchesTracked, tl.load(NumBatchesTracked) + 1)
    if CUMULATIVE:
        factor = 1.0 / tl.load(NumBatchesTracked).to(ACC)
    else:
        factor = exact_scalar(momentum, momentum_lo, ACC)
    running_mean = tl.load(RunningMean + c, mask=c_mask, other=0.0).to(ACC)
    running_var = tl.load(RunningVar + c, mask=c_mask, other=0.0).to(ACC)
    running_mean = factor * mean + (1.0 - factor) * running_mean
    running_var = factor * (var * bessel) + (1.0 - factor) * running_var
    tl.store(RunningMean + c, running_mean.to(RunningMean.dtype.element_ty), mask=c_mask)
    tl.store(RunningVar + c, running_var.to(RunningVar.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize_on_alignment=CALLER_RUNNING)
def _bn_update_running_stats(
    RunningMean, RunningVar,  # [C] updated in place, in their own dtype
    Mean, Var,  # [C] batch mean and biased variance (ACC)
    NumBatchesTracked,  # [] int64 counter, read when CUMULATIVE, incremented when COUNT_BATCH
    Count,  # [C] element counts (ACC), read when DEVICE_COUNT
    C, momentum, momentum_lo, bessel, bessel_lo,  # float pairs (common.exact_scalar); bessel = M / (M - 1)
    CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr, DEVICE_COUNT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid: cdiv(C, BLOCK_C).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(Mean + c, mask=c_mask, other=0.0)
    var = tl.load(Var + c, mask=c_mask, other=0.0)
    if DEVICE_COUNT:
        count = tl.load(Count + c, mask=c_mask, other=2.0)
        bessel = count / tl.maximum(count - 1.0, 1.0)
    else:
        bessel = exact_scalar(bessel, bessel_lo, ACC)
    blend_running_stats(RunningMean, RunningVar, NumBatchesTracked, c, c_mask, mean, var, momentum, momentum_lo,
                        bessel, CUMULATIVE, ACC, COUNT_BATCH, tl.program_id(0) == 0)
