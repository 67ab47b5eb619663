"""Weights from HF safetensors (or random, `load_format="dummy"`), placed straight on their shards.

Safetensors files are read through a memory map, and each device's slice of a tensor is cut
from the map by `jax.make_array_from_callback`, so no full replicated copy is made per device.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from jaxllm.model_arch import CheckpointNames, ModelArch, Quantization
from jaxllm.models.quantized import DUMMY_DRAWS, forget_converted, int4_tensor
from jaxllm.models.quantized_fp8 import FP8_DUMMY_DRAWS, Fp8Checkpoint
from jaxllm.models.sharding import ShardingRules
from pallas_kernels.grouped_matmul.mxfp4 import dequantize_mxfp4

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
}


class WeightLoadError(ValueError):
    pass


class SafetensorsFile:
    """A memory-mapped .safetensors file: name -> numpy view, nothing read until sliced."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.header = header
        self._data_start = 8 + header_len
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightLoadError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(dtype).reshape(info["shape"])


class Checkpoint:
    """Tensor name -> memory-mapped array, over the checkpoint's safetensors files. A name may also
    be found as the family spells it otherwise (`names`: GPT-2's hub checkpoints lack `transformer.`).

    An MXFP4 checkpoint (gpt-oss) stores a quantized tensor `X` [..., in, out] as `X_blocks` and
    `X_scales` ([..., out, in / 32, 16] and [..., out, in / 32]); it is dequantized here, whole,
    when asked for.
    """

    def __init__(self, files: dict[str, SafetensorsFile], names: CheckpointNames = CheckpointNames(),
                 quantization: Quantization | None = None):
        self.files = files
        self.names = names
        self.quantization = quantization

    def stored_name(self, name: str) -> str | None:
        return next((n for n in self.names.candidates(name) if n in self.files), None)

    def tensor(self, name: str, shape) -> np.ndarray:
        """The memory-mapped tensor `name`, checked against its expected shape."""
        stored = self.stored_name(name)
        if stored is None and self._mxfp4(name):
            tensor = self._dequantized(name)
        elif stored is None:
            raise WeightLoadError(f"checkpoint has no tensor {name}")
        else:
            tensor = self.files[stored].get(stored)
        if tuple(tensor.shape) != tuple(shape):
            raise WeightLoadError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint, expected {tuple(shape)}"
            )
        return tensor


    def _mxfp4(self, name: str) -> bool:
        q = self.quantization
        return (q is not None and q.method == "mxfp4" and q.converts(name.rsplit(".", 1)[0])
                and self.stored_name(f"{name}_blocks") is not None)

    def _dequantized(self, name: str) -> np.ndarray:
        blocks, scales = (self.files[n].get(n) for n in (self.stored_name(f"{name}_{p}") for p in ("blocks", "scales")))
        # [..., out, in] -> [..., in, out], as the unquantized checkpoint stores it.
        return np.swapaxes(dequantize_mxfp4(np.asarray(blocks), np.asarray(scales), ml_dtypes.bfloat16), -1, -2)


def open_checkpoint(model_dir: Path, names: CheckpointNames = CheckpointNames(),
                    quantization: Quantization | None = None) -> Checkpoint:
    """The tensors of model.safetensors, of a sharded index, or of every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: SafetensorsFile(model_dir / name) for name in sorted(set(weight_map.values()))}
        return Checkpoint({tensor: files[file] for tensor, file in weight_map.items()}, names, quantization)
    found = [model_dir / "model.safetensors"] if (model_dir / "model.safetensors").is_file() else sorted(
        model_dir.glob("*.safetensors"))  # unusual names, no index: take every file
    if not found:
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {model_dir} "
            "(only safetensors checkpoints are supported; use load_format='dummy' for random weights)"
        )
    by_name: dict[str, SafetensorsFile] = {}
    for path in found:
        f = SafetensorsFile(path)
        by_name.update({t: f for t in f.names()})
    return Checkpoint(by_name, names, quantization)


def hf_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _leaves(state: nnx.State) -> Iterator[tuple[tuple, nnx.Variable]]:
    yield from nnx.to_flat_state(state)


def load_weights(
    model_dir: Path,
    abstract_state: nnx.State,
    mesh: Mesh,
    rules: ShardingRules,
    load_format: str,
    seed: int,
    names: CheckpointNames = CheckpointNames(),
    quantization: Quantization | None = None,
) -> nnx.State:
    """Fill every Param of `abstract_state` with a sharded array of its dtype; returns the concrete
    state. `names`: how the checkpoint may spell the parameters' paths."""
    checkpoint = None if load_format == "dummy" else open_checkpoint(model_dir, names, quantization)
    if checkpoint is not None and quantization is not None and quantization.fp8 is not None:
        checkpoint = Fp8Checkpoint(checkpoint, quantization.fp8)  # the FP8 twins' fields (models/quantized_fp8.py)
    flat = list(_leaves(abstract_state))
    key = jax.random.key(seed)
    desc = "Random weights" if checkpoint is None else "Loading safetensors"
    # NOTE: disable=None: no bar where stderr is no terminal (a log file would keep its first frame).
    for i, (path, var) in enumerate(tqdm(flat, desc=desc, unit="tensor", leave=False, disable=None)):
        abstract = var.get_value()
        sharding = NamedSharding(mesh, rules.spec(var.get_metadata()["logical_axes"]))
        name = hf_name(path)
        fused = var.get_metadata().get("fused_from")
        int4_source = var.get_metadata().get("int4_source")
        if checkpoint is None:
            value = _random_leaf(var.get_metadata().get("init", "zeros"), abstract.shape, abstract.dtype,
                                 sharding, jax.random.fold_in(key, i))
        elif int4_source is not None:  # an int4 twin's field (models/quantized.py), converted whole on the host
            tensor = int4_tensor(checkpoint, name.rsplit(".", 1)[0], int4_source, abstract.shape).astype(
                abstract.dtype, copy=False)
            value = jax.make_array_from_callback(abstract.shape, sharding, lambda idx, t=tensor: t[idx])
        elif fused is not None:
            value = _fused_checkpoint_leaf(checkpoint, name, fused, abstract.shape, np.dtype(abstract.dtype), sharding)
        else:
            value = _checkpoint_leaf(checkpoint, name, abstract.shape, np.dtype(abstract.dtype), sharding)
        var.set_value(value)
    forget_converted()
    return abstract_state


def _checkpoint_leaf(checkpoint: Checkpoint, name: str, shape, dtype: np.dtype, sharding) -> jax.Array:
    tensor = checkpoint.tensor(name, shape)
    return jax.make_array_from_callback(shape, sharding, lambda idx: np.asarray(tensor[idx]).astype(dtype))


def _fused_checkpoint_leaf(checkpoint: Checkpoint, name: str, fused, shape, dtype: np.dtype,
                           sharding) -> jax.Array:
    """A fused parameter (models.layers.FusedFrom): each device's shard is filled from the part of
    every HF tensor's memory map that falls inside it (never a full copy)."""
    module = name.rsplit(".", 2)[0]  # model.layers.3.self_attn.qkv_proj.weight -> ...self_attn
    views = []
    for part in fused.parts:
        view = checkpoint.tensor(f"{module}.{part.name}", part.hf_shape).reshape(part.shape)
        views.append((part.offset, view if part.perm is None else view.transpose(part.perm)))

    def shard(idx: tuple[slice, ...]) -> np.ndarray:
        bounds = [s.indices(n)[:2] for s, n in zip(idx, shape, strict=True)]  # [(start, stop)] per axis
        out = np.empty([stop - start for start, stop in bounds], dtype)
        for offset, view in views:
            lo = [max(start, o) for (start, _), o in zip(bounds, offset, strict=True)]
            hi = [min(stop, o + n) for (_, stop), o, n in zip(bounds, offset, view.shape, strict=True)]
            if all(a < b for a, b in zip(lo, hi, strict=True)):
                into = tuple(slice(a - start, b - start) for a, b, (start, _) in zip(lo, hi, bounds, strict=True))
                out[into] = view[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))]
        return out

    return jax.make_array_from_callback(shape, sharding, shard)


def _random_leaf(init: str, shape, dtype, sharding, key) -> jax.Array:
    if init == "ones":
        return jax.jit(lambda: jnp.ones(shape, dtype), out_shardings=sharding)()
    if init in DUMMY_DRAWS or init in FP8_DUMMY_DRAWS:
        return _random_quantized_field(init, tuple(shape), dtype, sharding)(key)
    return _random_normal(tuple(shape), dtype, sharding)(key)


@cache
def _random_quantized_field(init: str, shape, dtype, sharding):
    draw = DUMMY_DRAWS.get(init) or FP8_DUMMY_DRAWS[init]
    return jax.jit(partial(draw, shape=shape, dtype=dtype), out_shardings=sharding)


@cache
def _random_normal(shape, dtype, sharding):
    # Drawn directly into its shards. std 0.02 as HF's initializer_range.
    draw = lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)  # noqa: E731
    return jax.jit(draw, out_shardings=sharding)


def resolve_dtype(name: str, arch: ModelArch, platform: str):
    """--dtype -> a jnp dtype. auto: the checkpoint's, with float32 served as bfloat16 on GPUs; half and float
    are float16 and float32, as in vLLM (numpy's "float" is float64)."""
    if name != "auto":
        return jnp.dtype({"half": "float16", "float": "float32"}.get(name, name))
    ckpt = arch.torch_dtype.replace("torch.", "")
    if ckpt in ("bfloat16", "float16"):
        return jnp.dtype(ckpt)
    return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory, or a model id found in the local Hugging Face cache (offline)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"--model {model} is a file; give the model's directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # the hub raises several types for "not in cache"
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor in the local Hugging Face cache"
            f"{' at revision ' + revision if revision else ''} (jaxllm does not download weights): {exc}"
        ) from None
