"""Peak memory and time of linear_cross_entropy against full-logit cross-entropy.

Compares, for embeddings e (N, d), a classifier c (C, d) and targets (N,), one forward and
backward pass of

- ``full_ce``:   ``F.cross_entropy(e @ c.T, targets)``, which holds the (N, C) logits, their
  log-softmax and their gradient;
- ``linear_ce``: ``fedsim.losses.linear_cross_entropy(e, c, targets)``, chunked over the
  classes (Cut Cross-Entropy).

Reported per variant: the peak EXTRA memory of forward + backward, i.e. the high-water mark
minus the memory held just before the pass, when e, c and targets already exist (so it
counts the gradients of e and c, which both variants produce, plus all temporaries), and the
wall time of forward + backward (median of ``--repeats`` timed runs after the measured one).

How memory is measured, honestly:

- CPU: PyTorch keeps no allocator statistics for CPU tensors (and tracemalloc does not see
  them), so each variant runs in a fresh subprocess that creates the inputs, runs a tiny pass
  to initialise the libraries, reads its resident set size (VmRSS), resets the kernel's RSS
  high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0), runs the measured pass
  and reads the high-water mark (VmHWM). Extra = VmHWM - VmRSS before. This is the real
  physical memory the pass needed, including allocator and BLAS workspace overheads, at page
  granularity. Where clear_refs is not available the script falls back to ru_maxrss, whose
  high-water mark includes the input creation; the JSON says which method was used.
- CUDA (when available): in process, ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the pass.

Targets: extra memory of linear_ce <= 10% of full_ce, time <= 2x.

Usage::

    python benchmarks/losses_memory.py            # N=8192, d=512, C=32768 (needs ~4 GiB RAM on CPU)
    python benchmarks/losses_memory.py --quick    # N=1024, d=128, C=4096, chunk 512: seconds

Writes a table to stdout and JSON to benchmarks/results/losses_memory.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsim.losses import linear_cross_entropy

VARIANTS = ("full_ce", "linear_ce")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "losses_memory.json"


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-rows", "-n", type=int, default=8192, help="N, rows of e (default 8192)")
    parser.add_argument("--dim", "-d", type=int, default=512, help="d, embedding size (default 512)")
    parser.add_argument("--num-classes", "-c", type=int, default=32768, help="C, classes (default 32768)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="classes per chunk of linear_ce (default 4096)")
    parser.add_argument("--softcap", type=float, default=None, help="logit soft-cap for both variants")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes: N=1024, d=128, C=4096, chunk 512")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: CPU, and CUDA if present")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_rows, args.dim, args.num_classes, args.chunk_size = 1024, 128, 4096, 512
    return args


def _inputs(args: argparse.Namespace, device: torch.device, scale: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    rows, classes = max(1, args.num_rows // scale), max(1, args.num_classes // scale)
    e = torch.randn(rows, args.dim, generator=generator).div_(args.dim**0.5).to(device).requires_grad_()
    c = torch.randn(classes, args.dim, generator=generator).to(device).requires_grad_()
    targets = torch.randint(0, classes, (rows,), generator=generator).to(device)
    return e, c, targets


def _loss(variant: str, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace):
    if variant == "linear_ce":
        return linear_cross_entropy(e, c, targets, softcap=args.softcap, chunk_size=args.chunk_size)
    logits = e @ c.T
    if args.softcap is not None:
        logits = args.softcap * torch.tanh(logits / args.softcap)
    return F.cross_entropy(logits, targets)


def _pass(variant: str, e, c, targets, args, device: torch.device) -> tuple[float, float]:
    """One forward + backward; returns (seconds, loss value). Clears the gradients first."""
    e.grad = c.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss = _loss(variant, e, c, targets, args)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, loss.item()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _cpu_worker(args: argparse.Namespace) -> dict:
    """Runs inside a fresh subprocess: measures one variant on CPU."""
    device = torch.device("cpu")
    _pass(args.worker, *_inputs(args, device, scale=64), args, device)
    e, c, targets = _inputs(args, device)
    try:
        before = _proc_status_bytes("VmRSS")
        resettable = _reset_rss_high_water_mark()
        seconds, value = _pass(args.worker, e, c, targets, args, device)
        peak = _proc_status_bytes("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "VmHWM after clear_refs" if resettable else "ru_maxrss (includes input creation)"
    except (OSError, RuntimeError):
        before = 0
        seconds, value = _pass(args.worker, e, c, targets, args, device)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "ru_maxrss (no /proc; absolute peak, not extra)"
    times = [seconds] + [_pass(args.worker, e, c, targets, args, device)[0] for _ in range(args.repeats)]
    return {
        "peak_extra_bytes": peak - before,
        "seconds_first": times[0],
        "seconds_median": statistics.median(times[1:]) if args.repeats else times[0],
        "loss": value,
        "memory_method": method,
    }


def _run_cpu(args: argparse.Namespace, argv: list[str]) -> dict:
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    return results


def _run_cuda(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    results = {}
    for variant in VARIANTS:
        _pass(variant, *_inputs(args, device, scale=64), args, device)
        e, c, targets = _inputs(args, device)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds, value = _pass(variant, e, c, targets, args, device)
        peak = torch.cuda.max_memory_allocated(device)
        times = [seconds] + [_pass(variant, e, c, targets, args, device)[0] for _ in range(args.repeats)]
        results[variant] = {
            "peak_extra_bytes": peak - before,
            "seconds_first": times[0],
            "seconds_median": statistics.median(times[1:]) if args.repeats else times[0],
            "loss": value,
            "memory_method": "torch.cuda.max_memory_allocated",
        }
        del e, c, targets
        torch.cuda.empty_cache()
    return results


def _summary(results: dict) -> dict:
    full, linear = results["full_ce"], results["linear_ce"]
    memory_ratio = linear["peak_extra_bytes"] / full["peak_extra_bytes"]
    time_ratio = linear["seconds_median"] / full["seconds_median"]
    return {
        "extra_memory_ratio": memory_ratio,
        "time_ratio": time_ratio,
        "loss_abs_difference": abs(linear["loss"] - full["loss"]),
        "meets_memory_target": memory_ratio <= 0.10,
        "meets_time_target": time_ratio <= 2.0,
    }


def _print_table(device: str, results: dict, summary: dict) -> None:
    print(f"\n{device}: peak extra memory and time of forward + backward")
    print(f"{'variant':<10} {'extra MiB':>10} {'median s':>9} {'first s':>8} {'loss':>12}")
    for variant in VARIANTS:
        row = results[variant]
        print(
            f"{variant:<10} {row['peak_extra_bytes'] / 2**20:>10.1f} {row['seconds_median']:>9.3f} "
            f"{row['seconds_first']:>8.3f} {row['loss']:>12.6f}"
        )
    print(
        f"linear/full: memory {summary['extra_memory_ratio']:.3f} (target <= 0.10, "
        f"{'met' if summary['meets_memory_target'] else 'NOT met'}), time {summary['time_ratio']:.2f}x "
        f"(target <= 2x, {'met' if summary['meets_time_target'] else 'NOT met'}), "
        f"|loss difference| {summary['loss_abs_difference']:.2e}"
    )


def main(argv: list[str]) -> None:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(_cpu_worker(args)))
        return
    torch.manual_seed(0)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "sizes": {
            "num_rows": args.num_rows,
            "dim": args.dim,
            "num_classes": args.num_classes,
            "chunk_size": args.chunk_size,
            "softcap": args.softcap,
            "dtype": "float32",
            "full_logits_bytes": args.num_rows * args.num_classes * 4,
        },
        "devices": {},
    }
    devices = ["cpu"] + (["cuda"] if args.device == "auto" and torch.cuda.is_available() else [])
    for device in devices:
        results = _run_cpu(args, argv) if device == "cpu" else _run_cuda(args)
        summary = _summary(results)
        report["devices"][device] = {"results": results, "summary": summary}
        _print_table(device, results, summary)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
