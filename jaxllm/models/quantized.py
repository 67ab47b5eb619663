"""int4 weight-only linears (AWQ GEMM, GPTQ, compressed-tensors pack-quantized) for the dense families
(Llama, Mistral, Qwen2, Qwen3: llama.py; GLM: glm4.py).

The family builds its bf16 modules as always; `quantize_model` then swaps every projection whose
checkpoint module is quantized (`Quantization.converts`) for its int4 twin, so a bf16 model's program
is untouched. A twin holds the kernel layout of `pallas_kernels.int4_matmul.Int4Weights`, with the
output features in the bf16 module's order (the sharded axis first):

    values      int4 [K, *N]   K: input features; *N: (out,) | (Hkv, G + 2, D) q/k/v | (I, 2) gate/up
    scales      [K / group, *N]  in the model's dtype
    zeros       [K / group, *N]  only where the checkpoint has zero points
    input_perm  int32 [K]      only under GPTQ desc_act (replicated)

and carries logical axes as the bf16 weight does: K is `embed` on column-parallel layers (q/k/v,
gate/up), and `q_heads` / `mlp` on row-parallel ones (o, down), so a row-parallel shard must hold
whole quantization groups (`quantize_model` refuses a tp that splits one).

Each parameter's `int4_source` metadata tells the loader which checkpoint modules it comes from:
`int4_tensor` converts them (whole, on the host) into the layout above and the loader cuts each
device's shard from it. Dummy weights draw each parameter by its `init` (`DUMMY_DRAWS`).

The matmul is a static attribute of each twin (so part of the layer's graphdef and jit key), picked
by `select_int4_kernel`: the Mosaic GPU kernel on GPUs where it takes the shape, else the XLA path
(dequantize + dot). Under tensor parallelism each device multiplies its own shard under shard_map
(column-parallel: its N columns; row-parallel: its K rows, summed over the mesh, as a bf16 row-parallel
layer's all-reduce), so the Mosaic kernel runs per shard as on one GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec, SingleDeviceSharding

from jaxllm.model_arch import INT4_METHODS, ModelArch, Quantization
from jaxllm.models.sharding import ShardingRules
from pallas_kernels.int4_matmul import Int4Weights, int4_matmul_xla
from pallas_kernels.int4_matmul.formats import awq_to_int4, gptq_to_int4, pack_quantized_to_int4

logger = logging.getLogger(__name__)

Int4MatmulFn = Callable[[jax.Array, Int4Weights], jax.Array]  # (x [M, K], w [K, N]) -> [M, N]


@dataclass(frozen=True)
class Int4Kernel:
    """The int4 matmul the twins call, the dtype their values are stored in, and the mesh it runs on per
    device (None: one device)."""

    matmul: Int4MatmulFn = int4_matmul_xla
    mesh: Mesh | None = None
    # NOTE: jax 0.10's CPU client holds int4 buffers unpacked while its compiler takes them packed, so an
    # AOT-compiled step (the engine's buckets) refuses int4 arguments there: where the two layouts differ
    # (`int4_buffers_fit_compiled`), the codes are stored as int8 (the same values) and cast in the step.
    storage: type = jnp.int4


INT4_FAMILIES = ("llama", "glm4")
# vLLM's names for its Marlin kernels on the same checkpoints: here they are the same methods.
MARLIN_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}


@dataclass(frozen=True)
class Int4Source:
    """Where a quantized parameter comes from: the checkpoint modules `parts` (names beside the
    twin's module, each with its output features), joined along N as `layout` says ("linear": one
    module; "qkv": q, k, v into [Hkv, G + 2, D]; "gate_up": gate, up into [I, 2]; "gate_up_fused":
    GLM's one gate_up_proj [2I] into [I, 2]); `field` names the Int4Weights field."""

    quantization: Quantization
    parts: tuple[tuple[str, int], ...]
    layout: str
    in_features: int  # K
    out_shape: tuple[int, ...]  # the twin's *N
    scale_dtype: np.dtype  # the model's dtype: scales and zeros are kept in it
    field: str = "values"


# ----------------------------------------------------------------------------------------------
# Modules


class Int4Projection(nnx.Module):
    """x [T, K] -> y [T, *N] on int4 weights (module docstring), plus an optional bias [*N]."""

    def __init__(self, in_features: int, out_shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
                 source: Int4Source, bias: nnx.Param | None, kernel: Int4Kernel, rules: ShardingRules):
        q = source.quantization
        self.group_size = group = q.group_size
        self.kernel = kernel
        # The mesh axes of the [K, N] matrix the kernel sees: K's, and N's (its first dim's; the others whole).
        k_axis, n_axis, *rest = rules.spec(axes)
        assert not any(rest), f"{axes}: only the first output dim may be sharded"
        self.mesh_axes = (k_axis, n_axis)
        grouped = (in_features // group, *out_shape)

        def field(name: str, shape: tuple[int, ...], field_dtype, init: str, field_axes=axes) -> nnx.Param:
            return nnx.Param(jnp.zeros(shape, field_dtype), logical_axes=field_axes, init=init,
                             int4_source=dataclasses.replace(source, field=name))

        self.values = field("values", (in_features, *out_shape), kernel.storage, "int4")
        self.scales = field("scales", grouped, dtype, "int4_scales")
        self.zeros = field("zeros", grouped, dtype, "int4_zeros") if q.zero_point else None
        self.input_perm = field("input_perm", (in_features,), jnp.int32, "permutation", (None,)) if q.desc_act else None
        self.bias = bias

    def project(self, x: jax.Array) -> jax.Array:
        """x [T, K] -> [T, *N]."""
        out_shape = self.values.shape[1:]
        flat = lambda p: None if p is None else p[...].reshape(p.shape[0], -1)  # noqa: E731 - [rows, N]
        w = Int4Weights(flat(self.values).astype(jnp.int4), flat(self.scales), flat(self.zeros),
                        None if self.input_perm is None else self.input_perm[...], self.group_size)
        y = self.kernel.matmul(x, w) if self.kernel.mesh is None else _per_device(self.kernel, self.mesh_axes, x, w)
        y = y.reshape(x.shape[0], *out_shape)
        return y if self.bias is None else y + self.bias[...]


def _per_device(kernel: Int4Kernel, mesh_axes: tuple[str | None, str | None], x: jax.Array,
                w: Int4Weights) -> jax.Array:
    """x [T, K] @ w [K, N] with each device multiplying its own shard (shard_map): a column-parallel
    layer's N shard, or a row-parallel layer's K shard summed over the mesh. A desc_act permutation
    of a row-parallel layer's input takes x whole and each device its rows of the permuted x."""
    k_axis, n_axis = mesh_axes
    weight = PartitionSpec(k_axis, n_axis)
    permuted = w.input_perm is not None

    def per_device(x, values, scales, zeros, input_perm):
        if permuted:
            x = jnp.take(x, input_perm, axis=1)  # [T, K]
            if k_axis is not None:
                rows = values.shape[0]
                x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(k_axis) * rows, rows, axis=1)
        y = kernel.matmul(x, Int4Weights(values, scales, zeros, None, w.group_size))  # [T, N / shards]
        return y if k_axis is None else jax.lax.psum(y, k_axis)

    x_spec = PartitionSpec() if permuted else PartitionSpec(None, k_axis)
    return jax.shard_map(per_device, mesh=kernel.mesh, in_specs=(x_spec, weight, weight, weight, PartitionSpec()),
                         out_specs=PartitionSpec(None, n_axis))(x, w.values, w.scales, w.zeros, w.input_perm)


class Int4Linear(Int4Projection):
    """`layers.Linear`'s twin ([out, in] nn.Linear layout in the checkpoint): x [T, K] -> [T, N]."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.project(x)


class SplitsQKV:
    """`layers.QKVProjection`'s call for a twin (int4 or FP8) whose `project` gives N = [Hkv, G + 2, D]
    (each KV head's query heads, k, v)."""

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]."""
        y = self.project(x)  # [T, Hkv, G + 2, D]
        group = y.shape[2] - 2
        q = y[:, :, :group].reshape(x.shape[0], -1, y.shape[-1])
        return q, y[:, :, group], y[:, :, group + 1]


class Int4QKVProjection(SplitsQKV, Int4Projection):
    """`layers.QKVProjection`'s int4 twin."""


class Int4GateUpProjection(Int4Projection):
    """`layers.GateUpProjection`'s twin: N is [I, 2] (gate and up side by side, so that a tp shard of
    I holds both halves and the [K, 2I] matrix the kernel sees stays sharded along its columns)."""

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [T, H] -> (gate [T, I], up [T, I])."""
        y = self.project(x)  # [T, I, 2]
        return y[..., 0], y[..., 1]


# ----------------------------------------------------------------------------------------------
# Swapping the bf16 projections for their twins


@dataclass(frozen=True)
class _Twin:
    """How to build one projection's twin: its class, K, *N, logical axes and the parts' layout."""

    cls: type[Int4Projection]
    in_features: int
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    layout: str


def quantize_model(model: nnx.Module, arch: ModelArch, dtype, rules: ShardingRules, tp: int,
                   kernel: Int4Kernel = Int4Kernel()) -> None:
    """Replace, in place, each projection of the abstract `model` (a `layers.CausalLM` of a dense family)
    whose checkpoint module `arch.quantization` converts by its int4 twin; embeddings, norms and
    lm_head stay as they are. Raises ValueError where tp splits a quantization group."""
    q = arch.quantization
    if q is None or q.method not in INT4_METHODS or q.fp8 is not None:
        return
    if arch.family not in INT4_FAMILIES:
        raise ValueError(f"{q.method} int4 checkpoints are served for the dense families (Llama, Mistral, Qwen2, "
                         f"Qwen3, GLM), not {arch.architecture}")
    h, i, d, kv = arch.hidden_size, arch.intermediate_size, arch.head_dim, arch.num_kv_heads
    qkv = _Twin(Int4QKVProjection, h, (kv, arch.num_heads // kv + 2, d), ("embed", "kv_heads", None, None), "qkv")
    separate = {name: _Twin(Int4Linear, h, (size,), ("embed", axis), "linear") for name, size, axis in (
        ("q_proj", arch.q_size, "q_heads"), ("k_proj", arch.kv_size, "kv_heads"), ("v_proj", arch.kv_size, "kv_heads"))}
    o_proj = _Twin(Int4Linear, arch.q_size, (h,), ("q_heads", "embed"), "linear")
    fused_gate_up = arch.family == "glm4"  # GLM's checkpoint has one gate_up_proj [2I, H]
    gate_up = _Twin(Int4GateUpProjection, h, (i, 2), ("embed", "mlp", None),
                    "gate_up_fused" if fused_gate_up else "gate_up")
    down = _Twin(Int4Linear, i, (h,), ("mlp", "embed"), "linear")
    for n, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        swap = lambda parent, attr, module, parts, twin, n=n: _swap(  # noqa: E731
            parent, attr, f"model.layers.{n}.{module}", parts, twin, q, dtype, rules, tp, kernel)
        if attn.qkv_proj is not None:
            swap(attn, "qkv_proj", "self_attn", (("q_proj", arch.q_size), ("k_proj", arch.kv_size),
                                                 ("v_proj", arch.kv_size)), qkv)
        else:
            for name, twin in separate.items():
                swap(attn, name, "self_attn", ((name, twin.out_shape[0]),), twin)
        swap(attn, "o_proj", "self_attn", (("o_proj", h),), o_proj)
        swap(mlp, "gate_up_proj", "mlp", (("gate_up_proj", 2 * i),) if fused_gate_up else (
            ("gate_proj", i), ("up_proj", i)), gate_up)
        swap(mlp, "down_proj", "mlp", (("down_proj", h),), down)


def _swap(parent: nnx.Module, attr: str, module: str, parts: tuple[tuple[str, int], ...], twin: _Twin,
          q: Quantization, dtype, rules: ShardingRules, tp: int, kernel: Int4Kernel) -> None:
    """parent.attr <- its twin, if the checkpoint modules `parts` (beside `module`'s name) are quantized."""
    converted = [q.converts(f"{module}.{name}") for name, _ in parts]
    if not any(converted):
        return
    if not all(converted):
        names = ", ".join(f"{module}.{name}" for name, _ in parts)
        raise ValueError(f"{names} are served as one fused projection, so they must all be quantized or all "
                         f"not; the checkpoint's {q.method} config converts only some")
    source = Int4Source(q, parts, twin.layout, twin.in_features, twin.out_shape, jnp.dtype(dtype))
    bias = getattr(getattr(parent, attr), "bias", None)  # kept as the bf16 module has it
    built = nnx.eval_shape(lambda: twin.cls(twin.in_features, twin.out_shape, twin.axes, dtype, source, bias, kernel,
                                            rules))
    _check_groups(f"{module}.{attr}", built, rules, tp)
    setattr(parent, attr, built)


def _check_groups(name: str, twin: Int4Projection, rules: ShardingRules, tp: int) -> None:
    k, group = twin.values.shape[0], twin.group_size
    if k % group:
        raise ValueError(f"{name}: {k} input features are not a multiple of the quantization group size {group}")
    if rules.spec(twin.values.get_metadata()["logical_axes"])[0] is not None and (k % tp or (k // tp) % group):
        raise ValueError(
            f"{name}: tensor_parallel_size={tp} splits its {k} input features into shards of {k / tp:g}, not whole "
            f"quantization groups of {group} (row-parallel int4 layers need {k // group} groups divisible by tp)")


def with_requested_quantization(arch: ModelArch, requested: str | None, load_format: str) -> ModelArch:
    """Apply `--quantization`: it must name the checkpoint's method; on an unquantized checkpoint it is
    accepted only with dummy weights (random weights in that method's int4 layout: group 128, zero
    points, as an AWQ GEMM checkpoint), which lets the benches run the 8B without an int4 checkpoint."""
    if requested is None:
        return arch
    requested = MARLIN_ALIASES.get(requested, requested)
    have = arch.quantization
    if have is not None:
        if have.method != requested:
            raise ValueError(f"--quantization {requested} does not match the checkpoint's quantization_config "
                             f"(quant_method {have.method})")
        return arch
    if requested not in INT4_METHODS:
        raise ValueError(f"--quantization {requested}: supported values are {', '.join(INT4_METHODS)}")
    if load_format != "dummy":
        raise ValueError(f"--quantization {requested} needs a {requested} checkpoint (its config.json has no "
                         "quantization_config); with --load-format dummy it draws random weights in that layout")
    return dataclasses.replace(arch, quantization=Quantization(requested))


# ----------------------------------------------------------------------------------------------
# The int4 matmul the twins call


def gpu_int4_matmul(x: jax.Array, w: Int4Weights) -> jax.Array:
    """The Mosaic GPU kernel where it can run this (static) shape, else the XLA path."""
    from pallas_kernels.int4_matmul import mosaic_gpu  # noqa: PLC0415 - a GPU-only import

    (m, k), n = x.shape, w.shape[1]
    reason = mosaic_gpu.mosaic_unsupported_reason(dtype=x.dtype, m=m, k=k, n=n, group_size=w.group_size)
    if reason is not None:
        logger.debug("int4 matmul: XLA path for [%d, %d] x [%d, %d] (%s)", m, k, k, n, reason)
        return int4_matmul_xla(x, w)
    return mosaic_gpu.int4_matmul_mosaic(x, w)


def select_int4_kernel(mesh: Mesh) -> Int4Kernel:
    """The Mosaic kernel on GPUs (per shape, `gpu_int4_matmul`), the XLA path elsewhere; under tensor
    parallelism run on each device's shard."""
    device = mesh.devices.flat[0]
    return Int4Kernel(gpu_int4_matmul if device.platform == "gpu" else int4_matmul_xla,
                      None if mesh.devices.size == 1 else mesh,
                      jnp.int4 if int4_buffers_fit_compiled(device) else jnp.int8)


@cache
def int4_buffers_fit_compiled(device) -> bool:
    """Whether an int4 array placed on `device` has the layout that a program compiled ahead of time for
    int4 arguments takes (on jax 0.10's CPU it does not: unpacked buffers, packed parameters)."""
    sharding = SingleDeviceSharding(device)
    placed = jax.device_put(np.zeros((2, 2), ml_dtypes.int4), sharding)
    compiled = jax.jit(lambda a: a).lower(jax.ShapeDtypeStruct((2, 2), jnp.int4, sharding=sharding)).compile()
    positional_formats, _ = compiled.input_formats
    return positional_formats[0].layout == placed.format.layout


# ----------------------------------------------------------------------------------------------
# Loading


def int4_tensor(checkpoint, module: str, source: Int4Source, shape: tuple[int, ...]) -> np.ndarray:
    """The whole parameter `source.field` of the twin at `module`, from the checkpoint's tensors
    (`checkpoint`: loader.Checkpoint), `shape` checked."""
    value = _converted(checkpoint, module, dataclasses.replace(source, field="values"))[source.field]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{module}.{source.field}: converted shape {value.shape}, expected {tuple(shape)}")
    return value


def forget_converted() -> None:
    """Drop the last twin's converted tensors (once a load is done)."""
    _converted.cache_clear()


# NOTE: a twin's fields are consecutive leaves of the load, so one cached conversion serves them all.
@lru_cache(maxsize=1)
def _converted(checkpoint, module: str, source: Int4Source) -> dict[str, np.ndarray]:
    parent = module.rsplit(".", 1)[0]  # model.layers.3.self_attn.qkv_proj -> model.layers.3.self_attn
    parts = [_read_part(checkpoint, f"{parent}.{name}", source.quantization, source.in_features, out,
                        source.scale_dtype)
             for name, out in source.parts]
    perms = [w.input_perm for w in parts]
    if source.quantization.desc_act:
        k = parts[0].shape[0]
        perms = [np.arange(k, dtype=np.int32) if p is None else p for p in perms]
        if any(not np.array_equal(p, perms[0]) for p in perms[1:]):
            raise ValueError(f"{parent}: the g_idx of {', '.join(n for n, _ in source.parts)} differ; fused "
                             "projections share their input, so desc_act needs one permutation")
    elif any(p is not None for p in perms):
        raise ValueError(f"{module}: g_idx puts input features out of group order, but desc_act is false")
    out = {f: _join([getattr(w, f) for w in parts], source) for f in ("values", "scales", "zeros")
           if getattr(parts[0], f) is not None}
    if source.quantization.desc_act:
        out["input_perm"] = perms[0]
    return out


def _read_part(checkpoint, module: str, q: Quantization, k: int, n: int, scale_dtype: np.dtype) -> Int4Weights:
    """One checkpoint module's int4 tensors (numpy) -> Int4Weights [K, N] (see pallas_kernels' formats.py
    for each layout)."""
    tensor = lambda name, shape: np.asarray(checkpoint.tensor(f"{module}.{name}", shape))  # noqa: E731
    stored = lambda name: checkpoint.stored_name(f"{module}.{name}") is not None  # noqa: E731
    groups = k // q.group_size
    if q.method == "awq":
        return awq_to_int4(tensor("qweight", (k, n // 8)), tensor("qzeros", (groups, n // 8)),
                           tensor("scales", (groups, n)), q.group_size, scale_dtype)
    if q.method == "gptq":
        qzeros = tensor("qzeros", (groups, n // 8)) if q.zero_point else None
        g_idx = tensor("g_idx", (k,)) if stored("g_idx") else None
        return gptq_to_int4(tensor("qweight", (k // 8, n)), qzeros, tensor("scales", (groups, n)), g_idx,
                            group_size=q.group_size, sym=not q.zero_point, checkpoint_format=q.checkpoint_format,
                            scale_dtype=scale_dtype)
    zero_point = tensor("weight_zero_point", (n // 8, groups)) if q.zero_point else None
    return pack_quantized_to_int4(tensor("weight_packed", (n, k // 8)), tensor("weight_scale", (n, groups)),
                                  zero_point, group_size=q.group_size, scale_dtype=scale_dtype)


def _join(tensors: list[np.ndarray], source: Int4Source) -> np.ndarray:
    """Per-part [rows, n_part] -> [rows, *N] in the twin's layout."""
    rows = tensors[0].shape[0]
    if source.layout == "linear":
        return tensors[0]
    if source.layout == "gate_up":
        return np.stack(tensors, axis=-1)  # [rows, I, 2]
    if source.layout == "gate_up_fused":
        return np.swapaxes(tensors[0].reshape(rows, 2, -1), 1, 2)  # [rows, 2I] -> [rows, I, 2]
    q, k, v = tensors  # [rows, Hq * D], [rows, Hkv * D] x 2
    kv_heads, width, head_dim = source.out_shape  # width: G + 2
    kv_part = (rows, kv_heads, 1, head_dim)
    return np.concatenate([q.reshape(rows, kv_heads, width - 2, head_dim), k.reshape(kv_part), v.reshape(kv_part)],
                          axis=2)  # [rows, Hkv, G + 2, D]


# NOTE: dummy int4 weights keep a dummy bf16 model's scale (std 0.02): codes uniform in [-8, 7] (std
# ~4.6) times scales around 0.02 / 4.6, zero points near the middle.
DUMMY_SCALE = 0.02 / 4.6

# A twin parameter's `init` -> (key, shape, dtype) -> its random value (`--load-format dummy`).
DUMMY_DRAWS: dict[str, Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]] = {
    "int4": lambda key, shape, dtype: jax.random.randint(key, shape, -8, 8, jnp.int8).astype(dtype),
    "int4_scales": lambda key, shape, dtype: (DUMMY_SCALE * jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5)
                                              ).astype(dtype),
    "int4_zeros": lambda key, shape, dtype: jax.random.randint(key, shape, -1, 2, jnp.int32).astype(dtype),
    "permutation": lambda key, shape, dtype: jax.random.permutation(key, shape[0]).astype(dtype),
}
