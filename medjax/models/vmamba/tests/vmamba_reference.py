"""Plain sequential numpy reference of VMamba's selective scan, written from upstream's description
(`csms6s.selective_scan_torch`): layouts and semantics as upstream's `selective_scan_fn`, float64, one step at a time.
"""

from __future__ import annotations

import numpy as np


def softplus(x):
    """torch softplus, beta 1, threshold 20."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def selective_scan_ref(u, delta, A, B, C, D, delta_bias):
    """u, delta: (batch, K*Dm, L); A: (K*Dm, N); B, C: (batch, K, N, L); D, delta_bias: (K*Dm,).

    For every (batch, k*Dm + d): h = 0; for l in 0..L-1: h = exp(delta_l A) * h + delta_l * B_l * u_l;
    y_l = sum_n C_l h + D u_l, with delta = softplus(delta + delta_bias) and B, C of direction k shared by its channels.
    Returns y (batch, K*Dm, L), float64.
    """
    u, delta, A, B, C, D, delta_bias = (np.asarray(t, np.float64) for t in (u, delta, A, B, C, D, delta_bias))
    batch, kd, length = u.shape
    k_dirs, n_state = B.shape[1], B.shape[2]
    d_inner = kd // k_dirs
    delta = softplus(delta + delta_bias[:, None])
    k_of = np.arange(kd) // d_inner  # direction of each flat channel
    Bc, Cc = B[:, k_of], C[:, k_of]  # (batch, K*Dm, N, L)
    h = np.zeros((batch, kd, n_state))
    y = np.empty((batch, kd, length))
    for t in range(length):
        h = np.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        y[:, :, t] = (h * Cc[..., t]).sum(-1) + D * u[:, :, t]
    return y
