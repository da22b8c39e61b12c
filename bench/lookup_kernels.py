"""Benchmark of the memory-lookup kernels and sparse optimizer steps.

GPU run (bf16 values, T=16384 tokens, 4 heads x 32 slots = K=128 rows per token, D=1024,
N in {2^16, 2^20, 2^22}; a few minutes at most on an H100)::

    python bench/lookup_kernels.py --json-out runs/bench_kernels.json

``--sweep`` also times each Triton kernel alone over launch configurations at 2^20 rows
(``--sweep-log2``) and prints the fastest; the launchers' defaults came from it.

CPU smoke run of the same logic on tiny shapes (torch reference, plus the Triton path
through the interpreter when ``TRITON_INTERPRET=1``)::

    TRITON_INTERPRET=1 python bench/lookup_kernels.py --smoke

Methods timed per N (median of ``--reps`` after ``--warmup``; CUDA events on GPU):

* ``triton``: :func:`memory_lookup`, sparse gradient, fused :func:`sparse_sgd_step_` /
  :func:`rowwise_adagrad_step_`.
* ``torch-ref``: :func:`memory_lookup_ref` with the same sparse gradient and the ``*_ref``
  steps (what ``backend="torch"`` runs).
* ``embedding_bag``: ``F.embedding_bag(mode="sum", per_sample_weights=...)``, forward only.
* ``gather-dense``: ``einsum(w, values[idx])``; autograd gives a dense (N, D) gradient,
  stepped with ``torch.optim.SGD`` or fused ``torch.optim.Adam``.
* ``copy``: ``x.clone()`` of a large buffer; its bandwidth (bytes read + written / time)
  is the reference for the floor.

Bytes floor (``b`` = bytes per element, ``U`` = distinct rows in the batch; indices,
weights and optimizer state are ignored, < 1% here)::

    R = T*K*D*b   gathered rows          O = T*D*b   output (= grad_out) bytes
    forward              = R + O                      read gathered rows, write output
    forward+backward     = 2*(R + O) + U*D*b          re-read rows for grad_w, read grad_out,
                                                      write each unique gradient row once
    forward+backward+step = 2*(R + O) + 2*U*D*b       ideal fused backward+step: read and
                                                      write each unique value row once

``floor_ms = floor_bytes / copy_bandwidth`` and ``x_floor = ms / floor_ms`` (1.0 = at the
copy roofline). ``gathered TB/s = R / time``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from knowedit.kernels import (
    memory_lookup,
    memory_lookup_ref,
    resolve_backend,
    rowwise_adagrad_step_,
    rowwise_adagrad_step_ref,
    sparse_sgd_step_,
    sparse_sgd_step_ref,
)

PHASES = ("forward", "forward+backward", "forward+backward+step")


@dataclass
class Config:
    """Benchmark shapes and repetition counts."""

    tokens: int = 16384
    heads: int = 4
    slots: int = 32
    dim: int = 1024
    n_log2: list[int] = field(default_factory=lambda: [16, 20, 22])
    dtype: str = "bfloat16"
    warmup: int = 3
    reps: int = 10
    copy_mib: int = 2048
    lr: float = 1e-3

    @property
    def k(self) -> int:
        return self.heads * self.slots


SMOKE = Config(tokens=16, heads=2, slots=3, dim=24, n_log2=[6, 9], warmup=1, reps=1, copy_mib=4)


@dataclass
class Row:
    """One measurement."""

    n: int
    method: str
    phase: str
    step: str
    ms: float
    gathered_tbps: float
    floor_ms: float
    x_floor: float


def make_timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    """Return ``time(fn, warmup, reps) -> median ms`` using CUDA events or perf_counter."""

    def time_cuda(fn: Callable[[], Any], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)

    def time_cpu(fn: Callable[[], Any], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    return time_cuda if device.type == "cuda" else time_cpu


def copy_bandwidth(cfg: Config, device: torch.device, timer: Callable[..., float]) -> float:
    """Device copy bandwidth in bytes/s: ``clone`` of a ``copy_mib`` buffer (read + write)."""
    x = torch.empty(cfg.copy_mib * 2**20, dtype=torch.uint8, device=device)
    x.fill_(1)
    ms = timer(lambda: x.clone(), cfg.warmup, cfg.reps)
    return 2 * x.numel() / (ms * 1e-3)


def floor_bytes(cfg: Config, n_unique: int, elem: int, phase: str) -> int:
    """Bytes floor of a phase (formula in the module docstring)."""
    gathered = cfg.tokens * cfg.k * cfg.dim * elem
    out = cfg.tokens * cfg.dim * elem
    rows = n_unique * cfg.dim * elem
    if phase == "forward":
        return gathered + out
    if phase == "forward+backward":
        return 2 * (gathered + out) + rows
    return 2 * (gathered + out) + 2 * rows


def bench_n(
    cfg: Config,
    n: int,
    device: torch.device,
    timer: Callable[..., float],
    copy_bps: float,
    log: Callable[[str], None],
) -> list[Row]:
    """All methods and phases for one table size N."""
    dtype = getattr(torch, cfg.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(n)
    values = torch.nn.Parameter(torch.randn(n, cfg.dim, device=device, dtype=dtype, generator=gen))
    indices = torch.randint(0, n, (cfg.tokens, cfg.k), device=device, generator=gen)
    scores = torch.randn(cfg.tokens, cfg.heads, cfg.slots, device=device, generator=gen)
    weights = scores.softmax(-1).reshape(cfg.tokens, cfg.k).requires_grad_()
    grad_out = torch.randn(cfg.tokens, cfg.dim, device=device, dtype=dtype, generator=gen)
    n_unique = int(torch.unique(indices).numel())
    gathered = cfg.tokens * cfg.k * cfg.dim * elem
    rows: list[Row] = []

    def record(method: str, phase: str, step: str, fn: Callable[[], Any]) -> None:
        try:
            ms = timer(fn, cfg.warmup, cfg.reps)
        except Exception as exc:  # report and go on (e.g. an op missing for a dtype)
            log(f"  {method} {phase} {step}: FAILED {type(exc).__name__}: {exc}")
            return
        floor_ms = floor_bytes(cfg, n_unique, elem, phase) / copy_bps * 1e3
        row = Row(
            n, method, phase, step, ms, gathered / (ms * 1e-3) / 1e12, floor_ms, ms / floor_ms
        )
        log(f"  {method:13s} {phase:22s} {step:8s} {ms:9.3f} ms  x{row.x_floor:6.2f} floor")
        rows.append(row)

    log(f"N = {n} (2^{int(math.log2(n))}), distinct rows U = {n_unique}")

    # Sparse paths: Triton kernels and the torch reference share the same structure.
    state = torch.zeros(n, dtype=torch.float32, device=device)
    sparse_impls: list[tuple[str, Any, Any, Any]] = [
        ("torch-ref", memory_lookup_ref, sparse_sgd_step_ref, rowwise_adagrad_step_ref)
    ]
    try:
        resolve_backend("triton", device)
        sparse_impls.insert(0, ("triton", memory_lookup, sparse_sgd_step_, rowwise_adagrad_step_))
    except (ValueError, RuntimeError) as exc:
        log(f"  triton: skipped ({exc})")
    for name, fwd, sgd, adagrad in sparse_impls:

        def forward(fwd: Any = fwd) -> None:
            with torch.no_grad():
                fwd(values, indices, weights)

        def fwd_bwd(fwd: Any = fwd) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(fwd(values, indices, weights), (values, weights), grad_out)

        def with_sgd(fwd_bwd: Any = fwd_bwd, sgd: Any = sgd) -> None:
            sgd(values, fwd_bwd()[0], cfg.lr)

        def with_adagrad(fwd_bwd: Any = fwd_bwd, adagrad: Any = adagrad) -> None:
            adagrad(values, state, fwd_bwd()[0], cfg.lr)

        record(name, "forward", "-", forward)
        record(name, "forward+backward", "-", fwd_bwd)
        record(name, "forward+backward+step", "sgd", with_sgd)
        record(name, "forward+backward+step", "adagrad", with_adagrad)

    def embedding_bag() -> None:
        with torch.no_grad():
            F.embedding_bag(indices, values, per_sample_weights=weights.to(dtype), mode="sum")

    record("embedding_bag", "forward", "-", embedding_bag)

    # Dense PyTorch gather path: (T, K, D) gather, dense (N, D) gradient, dense optimizers.
    w_lp = weights.detach().to(dtype).requires_grad_()

    def gather_fwd() -> torch.Tensor:
        return torch.einsum("tk,tkd->td", w_lp, values[indices])

    def gather_forward() -> None:
        with torch.no_grad():
            gather_fwd()

    def gather_fwd_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(gather_fwd(), (values, w_lp), grad_out)

    fused = device.type == "cuda"
    optimizers = {
        "sgd": torch.optim.SGD([values], lr=cfg.lr),
        "adam": torch.optim.Adam([values], lr=cfg.lr, fused=fused),
    }

    def gather_step(opt: torch.optim.Optimizer) -> None:
        values.grad = gather_fwd_bwd()[0]
        opt.step()
        values.grad = None

    record("gather-dense", "forward", "-", gather_forward)
    record("gather-dense", "forward+backward", "-", gather_fwd_bwd)
    for step_name, opt in optimizers.items():
        record("gather-dense", "forward+backward+step", step_name, lambda opt=opt: gather_step(opt))
    del optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


#: Launch configurations tried by ``--sweep`` (the library's defaults are among them).
SWEEP_FWD = [(bk, bd, nw) for bk in (4, 8, 16, 32) for bd in (128, 256, 512, 1024) for nw in (2, 4, 8)]
SWEEP_VALUES = [(bs, bd, nw) for bs in (4, 8, 16, 32) for bd in (256, 512, 1024) for nw in (2, 4, 8)]


def sweep(
    cfg: Config, n: int, device: torch.device, timer: Callable[..., float], copy_bps: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Time each Triton kernel alone at table size ``n`` over launch configurations.

    Returns one dict per (kernel, configuration) with its median ms and its bytes floor
    (forward and weight gradient: ``R + O``; value gradient: ``O``-sized reads of
    ``grad_out`` per contribution plus ``U*D*b`` written, counted as ``R + U*D*b``).
    """
    from knowedit.kernels._common import load_triton_module

    kern = load_triton_module("_lookup_triton")
    dtype = getattr(torch, cfg.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(n)
    values = torch.randn(n, cfg.dim, device=device, dtype=dtype, generator=gen)
    idx = torch.randint(0, n, (cfg.tokens, cfg.k), device=device, generator=gen)
    w = torch.rand(cfg.tokens, cfg.k, device=device, generator=gen)
    gout = torch.randn(cfg.tokens, cfg.dim, device=device, dtype=dtype, generator=gen)
    n_unique = int(torch.unique(idx).numel())
    gathered = cfg.tokens * cfg.k * cfg.dim * elem
    out_bytes = cfg.tokens * cfg.dim * elem
    results: list[dict[str, Any]] = []

    # Every configuration's result is checked against the library default's.
    expect = {
        "forward": kern.lookup_forward(values, idx, w).float(),
        "grad_weights": kern.lookup_backward_weights(values, idx, gout, w.dtype).float(),
        "grad_values": kern.lookup_backward_values(idx, w, gout, n, dtype).coalesce().values().float(),
    }

    def one(kernel: str, conf: dict[str, int], fn: Callable[[], Any], floor: int) -> None:
        try:
            got = fn()
            got = (got.coalesce().values() if got.is_sparse else got).float()
            same = bool(torch.allclose(got, expect[kernel], rtol=2e-2, atol=2e-2))
            ms = timer(fn, cfg.warmup, cfg.reps)
        except Exception as exc:  # e.g. out of shared memory for a large tile
            log(f"  sweep {kernel} {conf}: FAILED {type(exc).__name__}: {str(exc)[:120]}")
            return
        floor_ms = floor / copy_bps * 1e3
        results.append(
            {"kernel": kernel, **conf, "ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms, "matches_default": same}
        )  # fmt: skip
        log(f"  sweep {kernel:16s} {conf} {ms:8.3f} ms  x{ms / floor_ms:5.2f} floor{'' if same else '  MISMATCH'}")

    sort_ms = timer(lambda: torch.sort(idx.reshape(-1), stable=True), cfg.warmup, cfg.reps)
    results.append({"kernel": "sort(ids)", "ms": sort_ms})
    log(f"  sweep sort(ids) {sort_ms:.3f} ms")
    for bk, bd, nw in SWEEP_FWD:
        conf = {"block_k": bk, "block_d": bd, "num_warps": nw}
        one("forward", conf, lambda c=conf: kern.lookup_forward(values, idx, w, **c), gathered + out_bytes)
        one(
            "grad_weights", conf,
            lambda c=conf: kern.lookup_backward_weights(values, idx, gout, w.dtype, **c),
            gathered + out_bytes,
        )  # fmt: skip
    for bs, bd, nw in SWEEP_VALUES:
        conf = {"block_s": bs, "block_d": bd, "num_warps": nw}
        one(
            "grad_values", conf,
            lambda c=conf: kern.lookup_backward_values(idx, w, gout, n, dtype, **c),
            gathered + n_unique * cfg.dim * elem,
        )  # fmt: skip
    for kernel in ("forward", "grad_weights", "grad_values"):
        ok = (r for r in results if r["kernel"] == kernel and r["matches_default"])
        best = min(ok, key=lambda r: r["ms"], default=None)
        if best is not None:
            log(f"best {kernel}: {best}")
    return results


def markdown(rows: list[Row], device_name: str, copy_bps: float, cfg: Config) -> str:
    """Markdown table of the results."""
    lines = [
        f"Device: {device_name}; copy bandwidth {copy_bps / 1e12:.3f} TB/s; {cfg.dtype}, "
        f"T={cfg.tokens}, K={cfg.k} ({cfg.heads}x{cfg.slots}), D={cfg.dim}",
        "",
        "| N | method | phase | step | ms | gathered TB/s | floor ms | x floor |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| 2^{int(math.log2(r.n))} | {r.method} | {r.phase} | {r.step} | {r.ms:.3f} | "
            f"{r.gathered_tbps:.3f} | {r.floor_ms:.3f} | {r.x_floor:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
    parser.add_argument("--json-out", type=str, default=None, help="write results as JSON")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warmup calls")
    parser.add_argument("--n-log2", type=int, nargs="+", default=None, help="table sizes 2^x")
    parser.add_argument(
        "--sweep", action="store_true",
        help="also time each Triton kernel alone over launch configurations (at --sweep-log2)",
    )  # fmt: skip
    parser.add_argument("--sweep-log2", type=int, default=20, help="table size 2^x of the sweep")
    args = parser.parse_args(argv)

    cfg = replace(SMOKE) if args.smoke else Config()
    for key in ("reps", "warmup", "n_log2"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if torch.cuda.is_available() and not args.smoke:
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name()
    elif args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    else:
        print("bench/lookup_kernels.py needs a CUDA GPU; use --smoke for a CPU run", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    timer = make_timer(device)
    t_start = time.perf_counter()
    copy_bps = copy_bandwidth(cfg, device, timer)
    log(f"{device_name}: copy bandwidth {copy_bps / 1e12:.3f} TB/s")
    rows: list[Row] = []
    for e in cfg.n_log2:
        rows.extend(bench_n(cfg, 1 << e, device, timer, copy_bps, log))
    print(markdown(rows, device_name, copy_bps, cfg))
    swept = sweep(cfg, 1 << args.sweep_log2, device, timer, copy_bps, log) if args.sweep else []
    log(f"total {time.perf_counter() - t_start:.1f} s")

    if args.json_out:
        result = {
            "device": device_name,
            "torch": torch.__version__,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "config": asdict(cfg),
            "copy_bytes_per_s": copy_bps,
            "floor_formula": {
                "forward": "T*K*D*b + T*D*b",
                "forward+backward": "2*(T*K*D*b + T*D*b) + U*D*b",
                "forward+backward+step": "2*(T*K*D*b + T*D*b) + 2*U*D*b",
                "floor_ms": "floor_bytes / copy_bytes_per_s",
            },
            "rows": [asdict(r) for r in rows],
            "sweep": swept,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
        log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
