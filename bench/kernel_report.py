"""What the kernel benches (bench/grouped_matmul.py, bench/int4_matmul.py) share: a log kept for
the output folder, table cells, and the three files each writes."""

from __future__ import annotations

import json
import os

import jax


class Log:
    """Lines printed as they come and kept, to write beside the table."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        self.lines.append(line)
        print(line, flush=True)


def ceilings_sentence(bandwidth: float, rate: float) -> str:
    return (f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}; ceilings measured in the same run: copy "
            f"{bandwidth / 1e12:.2f} TB/s (read + write), dense bf16 matmul {rate / 1e12:.0f} TFLOP/s.")


def cell(row: dict, key: str, fmt: str = "{:.1f}") -> str:
    """row[key] formatted; "fail" where the row holds `<key less _us>_error`, else empty."""
    v = row.get(key)
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return "fail" if f"{key[:-3]}_error" in row else ""


def kernel_only_cell(row: dict) -> str:
    if "kernel_only_fraction" not in row:
        return ""
    return f"{row['mosaic_kernel_only_us']:.1f} ({row['kernel_only_fraction']:.2f})"


def write_outputs(out_dir: str, stem: str, table: str, log: Log, payload: dict) -> str:
    """<stem>.md (the table), <stem>.log and <stem>.json in out_dir; returns the table."""
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, f"{stem}.log"), "w") as f:
        f.write("\n".join(log.lines) + "\n")
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(payload, f, default=str, indent=1)
    return table
