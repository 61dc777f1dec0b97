"""VMamba (MzeroMiko/VMamba, the 2024 "v2" classification models: VMamba-S / VMamba-B `s2l15`) in Flax.

The network is upstream's `VSSM` with `forward_type="v05_noz"`, `patchembed_version="v2"`,
`downsample_version="v3"` and LayerNorm(2d) eps 1e-5 (see tests/fixtures/vmamba/ARCHITECTURE.md). Upstream runs
channel-first; this port runs NHWC, where LayerNorm2d is a LayerNorm over the last axis and Linear2d a Dense layer.

The SS2D block scans every feature map in four directions (row-major, column-major, and both reversed) with a
selective state-space recurrence `h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l`, `y_l = C_l h_l + D u_l`. Here it
runs as a `jax.lax.associative_scan` (see `linear_recurrence`): parallel inside chunks of `scan_chunk` positions,
chunk to chunk through a short `lax.scan`. `selective_scan` has a custom VJP whose backward pass is the same scan run
in reverse plus fused elementwise terms, so a block keeps only its inputs and the states h for the gradient instead
of the scan tree's and the discretisation's intermediates.
Internally the SS2D tensors are sequence-first, (L, batch, K, D), which makes the scan's strided slices contiguous.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from medjax.models.base import Backbone, ConfigMixin, Part
from medjax.models.family import staged_layers
from medjax.models.layers import Mlp, gelu, layer_norm

NORM_EPS = 1e-5  # upstream LayerNorm / LayerNorm2d default
K_DIRECTIONS = 4


@dataclasses.dataclass(frozen=True)
class VMambaConfig(ConfigMixin):
    family: str = "vmamba"
    dims: tuple[int, ...] = (96, 192, 384, 768)  # stage widths C_i
    depths: tuple[int, ...] = (2, 2, 15, 2)
    patch_size: int = 4
    in_chans: int = 3
    d_state: int = 1  # N
    ssm_ratio: float = 2.0  # d_inner = int(ssm_ratio * C)
    dt_rank: int | str = "auto"  # "auto": ceil(C / 16) per stage
    ssm_conv: int = 3  # depthwise conv size; < 2 means no conv (as upstream)
    ssm_conv_bias: bool = False
    mlp_ratio: float = 4.0
    img_size: int = 224  # the nominal input size (the network itself takes any size)
    # Implementation, not architecture: positions scanned in parallel per step of the chunk loop. None (or >= L)
    # scans the whole sequence in one associative scan (most parallel; best on GPU/TPU for short sequences).
    scan_chunk: int | None = 64

    def __post_init__(self):
        self.check_family("vmamba", "dims", "depths")
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ValueError(f"VMambaConfig: dims {self.dims} and depths {self.depths} must have the same length")
        if self.ssm_ratio <= 0 or self.mlp_ratio <= 0 or self.d_state < 1:
            raise ValueError("VMambaConfig: ssm_ratio and mlp_ratio must be > 0 and d_state >= 1")
        if self.ssm_conv > 1 and self.ssm_conv % 2 == 0:
            raise ValueError(f"VMambaConfig: ssm_conv must be odd (upstream pads (k-1)//2), got {self.ssm_conv}")
        if self.dt_rank != "auto" and not (isinstance(self.dt_rank, int) and self.dt_rank > 0):
            raise ValueError(f"VMambaConfig: dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.patch_size < 2:
            raise ValueError(f"VMambaConfig: patch_size must be >= 2 (patch embed v2 strides patch_size // 2), "
                             f"got {self.patch_size}")
        if self.scan_chunk is not None and self.scan_chunk < 1:
            raise ValueError(f"VMambaConfig: scan_chunk must be None or >= 1, got {self.scan_chunk}")

    def d_inner(self, stage: int) -> int:
        return int(self.ssm_ratio * self.dims[stage])

    def rank(self, stage: int) -> int:
        return math.ceil(self.dims[stage] / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d | {"dims": list(self.dims), "depths": list(self.depths)}


# ------------------------------------------------------------------------------------------------ selective scan

def _combine(earlier, later):
    """(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): applying h -> a1 h + b1, then h -> a2 h + b2."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _chunked_scan(a, b, chunk: int | None, reverse: bool = False):
    """h_l = a_l h_{l-1} + b_l along axis 0 from h = 0 (reverse: h_l = a_l h_{l+1} + b_l from the end).

    The sequence is cut into chunks of `chunk` positions; each chunk is one parallel associative scan, and a
    `lax.scan` over the chunks carries the state, so the scan tree's temporaries are those of one chunk.
    """
    length = a.shape[0]
    if chunk is None or chunk >= length:
        return jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=0)[1]
    size = max(d for d in range(1, chunk + 1) if length % d == 0)  # a divisor avoids padding copies
    if size < chunk // 2:
        size = chunk
    n_chunks = -(-length // size)
    pad = n_chunks * size - length
    if pad:  # identity steps (a = 1, b = 0) after the end: no effect either way
        a = jnp.concatenate([a, jnp.ones((pad,) + a.shape[1:], a.dtype)])
        b = jnp.concatenate([b, jnp.zeros((pad,) + b.shape[1:], b.dtype)])
    a = a.reshape((n_chunks, size) + a.shape[1:])
    b = b.reshape((n_chunks, size) + b.shape[1:])

    def step(carry, ab):
        a_cum, h = jax.lax.associative_scan(_combine, ab, reverse=reverse, axis=0)
        h = h + a_cum * carry[None]
        return (h[0] if reverse else h[-1]), h

    _, h = jax.lax.scan(step, jnp.zeros(a.shape[2:], a.dtype), (a, b), reverse=reverse)
    return h.reshape((n_chunks * size,) + h.shape[2:])[:length]


def linear_recurrence(a, b, chunk: int | None = 64, reverse: bool = False):
    """h_l = a_l * h_{l-1} + b_l along axis 0 from h = 0 (reverse: h_l = a_l * h_{l+1} + b_l from the end),
    elementwise over the other axes, as a chunked parallel associative scan (differentiable by plain autodiff;
    `selective_scan` has its own, leaner gradient)."""
    shape = a.shape  # one flat axis beside the sequence: the same arithmetic, half the compile time of a 5-D scan
    return _chunked_scan(a.reshape(shape[0], -1), b.reshape(shape[0], -1), chunk, reverse).reshape(shape)


def softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20: identity above 20)."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def selective_scan(u, delta, A, B, C, D, delta_bias, chunk: int | None = 64):
    """Upstream's `selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus=True)`, sequence-first.

    u, delta: (L, batch, K, d_inner); A: (K, d_inner, N) (already -exp(A_logs)); B, C: (L, batch, K, N) (shared by
    the channels of a direction); D, delta_bias: (K, d_inner). Returns y (L, batch, K, d_inner). Runs in float32
    (or float64 if given float64).

        delta = softplus(delta + delta_bias);  h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l;  y_l = C_l h_l + D u_l
    """
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    return _selective_scan(*(t.astype(dtype) for t in (u, delta, A, B, C, D, delta_bias)), chunk)


def _scan_inputs(u, delta_raw, A, B, delta_bias):
    x = delta_raw + delta_bias
    delta = softplus(x)
    a = jnp.exp(delta[..., None] * A)  # zero-order-hold decay, (L, b, K, d, N)
    return x, delta, a


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _selective_scan(u, delta_raw, A, B, C, D, delta_bias, chunk):
    return _selective_scan_fwd(u, delta_raw, A, B, C, D, delta_bias, chunk)[0]


def _selective_scan_fwd(u, delta_raw, A, B, C, D, delta_bias, chunk):
    _, delta, a = _scan_inputs(u, delta_raw, A, B, delta_bias)
    h = linear_recurrence(a, (delta * u)[..., None] * B[..., None, :], chunk)  # Euler input step
    y = (h * C[..., None, :]).sum(-1) + u * D
    # Saved for the backward pass: the inputs and the states h; the decays are recomputed (one exp).
    return y, (u, delta_raw, A, B, C, D, delta_bias, h)


def _selective_scan_bwd(chunk, residuals, dy):
    u, delta_raw, A, B, C, D, delta_bias, h = residuals
    x, delta, a = _scan_inputs(u, delta_raw, A, B, delta_bias)
    # dL/dh_l through y_l and all later states: g_l = C_l dy_l + a_{l+1} g_{l+1}, the recurrence run backwards.
    a_next = jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])
    g = linear_recurrence(a_next, dy[..., None] * C[..., None, :], chunk, reverse=True)
    h_prev = jnp.concatenate([jnp.zeros_like(h[:1]), h[:-1]])
    g_da = g * h_prev * a  # dL/d(delta A), per state
    g_b = (g * B[..., None, :]).sum(-1)  # dL/d(delta u)
    d_delta = (g_da * A).sum(-1) + g_b * u
    dx = d_delta * jnp.where(x > 20.0, 1.0, jax.nn.sigmoid(x))  # softplus' (identity above the threshold)
    du = g_b * delta + dy * D
    dA = (g_da * delta[..., None]).sum((0, 1))
    dB = (g * (delta * u)[..., None]).sum(-2)  # B is shared by the d_inner channels of a direction
    dC = (dy[..., None] * h).sum(-2)
    dD = (dy * u).sum((0, 1))
    return du, dx, dA, dB, dC, dD, dx.sum((0, 1))


_selective_scan.defvjp(_selective_scan_fwd, _selective_scan_bwd)


# ------------------------------------------------------------------------------------------------ modules

def _conv(features, kernel, stride, pad, name, dtype):
    # explicit symmetric padding as PyTorch (Flax 'SAME' pads (0, 1) for stride 2 on even sizes)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name)


def cross_scan(x):
    """(B, H, W, D) -> the four scan orders, sequence-first (L, B, K=4, D): k=0 row-major (l = h*W + w), k=1
    column-major (l = w*H + h), k=2 and k=3 the same reversed."""
    batch, height, width, channels = x.shape
    rows = jnp.transpose(x, (1, 2, 0, 3)).reshape(height * width, batch, channels)
    cols = jnp.transpose(x, (2, 1, 0, 3)).reshape(height * width, batch, channels)
    return jnp.stack([rows, cols, rows[::-1], cols[::-1]], axis=2)


def cross_merge(ys, height: int, width: int):
    """(L, B, 4, D) -> (B, H, W, D): every direction put back at its pixel, then a plain sum (not a mean)."""
    _, batch, _, channels = ys.shape
    y_rows = ys[:, :, 0] + ys[::-1, :, 2]  # l = h*W + w
    y_cols = ys[:, :, 1] + ys[::-1, :, 3]  # l = w*H + h
    return (jnp.transpose(y_rows.reshape(height, width, batch, channels), (2, 0, 1, 3))
            + jnp.transpose(y_cols.reshape(width, height, batch, channels), (2, 1, 0, 3)))


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv, stride 1, symmetric padding (k-1)//2, as upstream's `nn.Conv2d(groups=D)`. Written as k*k
    shifted multiply-adds: XLA's CPU grouped convolution is ~20x slower, its gradient more so. Parameters as
    nn.Conv(feature_group_count=D): kernel (k, k, 1, D), bias (D,)."""

    kernel_size: int
    use_bias: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        k, channels = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3), (k, k, 1, channels))
        dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        height, width, pad = x.shape[1], x.shape[2], (k - 1) // 2
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out = sum(xp[:, i:i + height, j:j + width] * kernel[i, j, 0] for i in range(k) for j in range(k))
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (channels,)).astype(dtype)
        return out


class SS2D(nn.Module):
    """SS2D, forward_type v05_noz: in_proj -> depthwise conv -> SiLU -> 4-direction selective scan -> sum ->
    out_norm -> out_proj. No z gate. Parameters keep upstream's names and layouts (x_proj_weight (K, R+2N, D),
    dt_projs_weight (K, D, R), dt_projs_bias (K, D), A_logs (K*D, N), Ds (K*D,))."""

    d_inner: int
    d_state: int
    dt_rank: int
    d_conv: int = 3
    conv_bias: bool = False
    scan_chunk: int | None = 64
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        K, D, N, R = K_DIRECTIONS, self.d_inner, self.d_state, self.dt_rank
        x = nn.Dense(D, use_bias=False, dtype=self.dtype, name="in_proj")(x)
        if self.d_conv > 1:
            x = DepthwiseConv(self.d_conv, self.conv_bias, self.dtype, name="conv2d")(x)
        x = nn.silu(x)

        def uniform(scale):
            return (lambda key, shape, dt=jnp.float32: jax.random.uniform(key, shape, dt, -scale, scale))
        x_proj_weight = self.param("x_proj_weight", uniform(D ** -0.5), (K, R + 2 * N, D))
        dt_projs_weight = self.param("dt_projs_weight", uniform(R ** -0.5), (K, D, R))
        dt_projs_bias = self.param("dt_projs_bias", _dt_bias_init, (K, D))
        A_logs = self.param("A_logs", lambda key, shape: jnp.log(jnp.broadcast_to(
            jnp.arange(1, N + 1, dtype=jnp.float32), shape)), (K * D, N))
        Ds = self.param("Ds", nn.initializers.ones, (K * D,))

        xs = cross_scan(x)
        hp = jax.lax.Precision.HIGHEST if self.dtype is None else None
        x_dbl = jnp.einsum("lbkd,kcd->lbkc", xs, x_proj_weight.astype(xs.dtype), precision=hp)
        dts, Bs, Cs = jnp.split(x_dbl, [R, R + N], axis=-1)
        dts = jnp.einsum("lbkr,kdr->lbkd", dts, dt_projs_weight.astype(xs.dtype), precision=hp)
        A = -jnp.exp(A_logs.astype(jnp.promote_types(A_logs.dtype, jnp.float32))).reshape(K, D, N)
        ys = selective_scan(xs, dts, A, Bs, Cs, Ds.reshape(K, D), dt_projs_bias, self.scan_chunk)
        y = cross_merge(ys, height, width)
        y = layer_norm(NORM_EPS, "out_norm", self.dtype)(y)
        out_dtype = self.dtype or x.dtype
        return nn.Dense(channels, use_bias=False, dtype=self.dtype, name="out_proj")(y.astype(out_dtype))


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    # upstream "v0" init: dt log-uniform in [dt_min, dt_max], bias = inverse softplus(dt)
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class StagePart(Part):
    """A module of stage `stage` (0-based): its widths come from the config."""

    stage: int = dataclasses.field(kw_only=True)


class VSSBlock(StagePart):
    """x + SS2D(norm(x)), then x + mlp(norm2(x)) (DropPath is the identity at inference)."""

    @nn.compact
    def __call__(self, x):
        c, s = self.config, self.stage
        y = layer_norm(NORM_EPS, "norm", self.dtype)(x)
        x = x + SS2D(c.d_inner(s), c.d_state, c.rank(s), c.ssm_conv, c.ssm_conv_bias, c.scan_chunk, self.dtype,
                     name="op")(y).astype(x.dtype)
        y = layer_norm(NORM_EPS, "norm2", self.dtype)(x)
        return x + Mlp(int(c.dims[s] * c.mlp_ratio), True, self.dtype, name="mlp")(y).astype(x.dtype)


class PatchEmbed(nn.Module):
    """Patch embed v2: conv(k, s, pad 1) -> LN -> GELU -> conv(k, s, pad 1) -> LN, s = patch_size // 2, k = s + 1."""

    dim: int
    patch_size: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        stride = self.patch_size // 2
        x = _conv(self.dim // 2, stride + 1, stride, 1, "conv1", self.dtype)(x)
        x = gelu(layer_norm(NORM_EPS, "norm1", self.dtype)(x))
        x = _conv(self.dim, stride + 1, stride, 1, "conv2", self.dtype)(x)
        return layer_norm(NORM_EPS, "norm2", self.dtype)(x)


class VSSLayer(StagePart):
    """Stage i: its blocks, then (except for the last stage) downsample v3: conv k3 s2 pad 1 -> LN."""

    @nn.compact
    def __call__(self, x):
        c, s = self.config, self.stage
        for j in range(c.depths[s]):
            x = VSSBlock(c, self.dtype, stage=s, name=f"blocks_{j}")(x)
        if s < len(c.depths) - 1:
            x = _conv(c.dims[s + 1], 3, 2, 1, "downsample_conv", self.dtype)(x)
            x = layer_norm(NORM_EPS, "downsample_norm", self.dtype)(x)
        return x


class VMamba(Backbone):
    """NHWC images -> {pooled_feature, last_stage_feature_map (NCHW, before the final norm), linear_head_input,
    attention_head_input (final-normed last-stage tokens, row-major, (B, H*W, C))}. The selective scan runs in float32
    whatever the compute dtype."""

    @nn.compact
    def forward(self, images, train):
        c = self.config
        x = PatchEmbed(c.dims[0], c.patch_size, self.dtype, name="patch_embed")(images)
        for i in range(len(c.depths)):
            x = VSSLayer(c, self.dtype, stage=i, name=f"layers_{i}")(x)
        x_norm = layer_norm(NORM_EPS, "classifier_norm", self.dtype)(x)  # upstream classifier.norm
        batch, height, width, channels = x.shape
        pooled = x_norm.mean(axis=(1, 2))
        return {
            "pooled_feature": pooled,
            "last_stage_feature_map": jnp.transpose(x, (0, 3, 1, 2)),
            "linear_head_input": pooled,
            "attention_head_input": x_norm.reshape(batch, height * width, channels),
        }


def layers(config: VMambaConfig) -> list[str]:
    """The patch embedding, then every block in network order across the stages (`layers_<s>/blocks_<j>` restart
    their numbering in each stage). Stage s's downsample runs between its last block and stage s + 1's first, and is
    counted with the block it feeds; the classifier norm comes after."""
    return staged_layers("patch_embed/", config.depths, "layers_{s}/blocks_{j}/", "layers_{previous}/downsample_")


def lora_targets(config: VMambaConfig) -> list[str]:
    return [r"layers_\d+/blocks_\d+/mlp/(fc1|fc2)/kernel$"]
