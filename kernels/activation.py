"""The activations that can follow BatchNorm (and a residual add) inside the same kernel.

    z = BN(x) + residual
    y = act(z)            act in {identity, relu, silu, leaky_relu(slope)}

Backward needs act'(z): for relu only the sign of z, read off the output y; for silu and
leaky_relu, z itself, recomputed from x, the saved statistics, the affine parameters and the
residual. No mask or pre-activation is stored.
"""

import triton
import triton.language as tl

# Values of the ACTIVATION constexpr (tritonbn/_checks.py's ACTIVATIONS maps names to them).
NONE = 0
RELU = 1
SILU = 2
LEAKY_RELU = 3


@triton.jit
def activate(z, slope, ACTIVATION: tl.constexpr):
    # Comparisons are written so that NaN propagates, as in torch.
    if ACTIVATION == 1:
        z = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == 2:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 3:
        z = tl.where(z < 0.0, z * slope, z)
    return z


@triton.jit
def activation_grad(z, dy, slope, ACTIVATION: tl.constexpr):
    """dy * act'(z)."""
    if ACTIVATION == 1:
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACTIVATION == 2:
        sig = tl.sigmoid(z)
        dy = dy * (sig * (1.0 + z * (1.0 - sig)))
    elif ACTIVATION == 3:
        dy = tl.where(z > 0.0, dy, dy * slope)
    return dy
