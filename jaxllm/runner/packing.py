"""One host->device transfer per step: a step's small arrays packed into one int32 buffer.

`jax.device_put` costs tens of microseconds per array in Python and runtime overhead, whatever
its size, and a step has a dozen metadata arrays plus the sampling columns. Packed, they travel
as one buffer and are cut apart inside the jitted function by a static `Layout` (the fields'
names, shapes and dtypes, known from the bucket), which costs nothing on the device.

Every field is 32 bits wide (int32, uint32, float32: bit-cast) or bool (stored as 0/1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_WORD = np.dtype(np.int32)


@dataclass(frozen=True)
class Layout:
    """Static description of a packed buffer: (name, shape, dtype name) per field, in order."""

    fields: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.fields)


def layout_of(arrays: Mapping[str, np.ndarray | None]) -> Layout:
    return Layout(tuple((name, tuple(a.shape), a.dtype.name) for name, a in arrays.items() if a is not None))


def pack(arrays: Mapping[str, np.ndarray | None]) -> tuple[np.ndarray, Layout]:
    """numpy arrays (None: absent) -> (int32 buffer [layout.size], layout)."""
    layout = layout_of(arrays)
    out = np.empty(layout.size, _WORD)
    offset = 0
    for name, _, _ in layout.fields:
        a = np.asarray(arrays[name])
        n = a.size
        if a.dtype == np.bool_:
            out[offset : offset + n] = a.reshape(-1)
        elif a.dtype.itemsize == 4:
            out[offset : offset + n] = a.reshape(-1).view(_WORD)
        else:
            raise TypeError(f"packing {name}: {a.dtype} is not a 32-bit or bool dtype")
        offset += n
    return out, layout


def unpack(buffer, layout: Layout) -> dict:
    """Inside a jitted function: the int32 buffer [layout.size] -> {name: array} (shapes, dtypes restored)."""
    import jax.numpy as jnp
    from jax import lax

    out = {}
    offset = 0
    for name, shape, dtype in layout.fields:
        n = int(np.prod(shape, dtype=np.int64))
        flat = lax.slice(buffer, (offset,), (offset + n,))
        if dtype == "bool":
            value = flat != 0
        elif dtype == _WORD.name:
            value = flat
        else:
            value = lax.bitcast_convert_type(flat, jnp.dtype(dtype))
        out[name] = value.reshape(shape)
        offset += n
    return out
