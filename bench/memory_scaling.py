"""CPU scaling benchmark: one product-key memory layer vs a dense FFN of equal size.

Times ONE :class:`knowedit.memory.ProductKeyMemory` layer with its own
:class:`knowedit.memory.ValuePool` (torch backend, fp32, Memory+ defaults: swilu gating,
qk-norm) at ``N = 2^s`` value rows (``n_keys = 2^(s/2)`` half-keys per head), beside a
dense FFN ``Linear(d, h) -> GELU -> Linear(h, d)`` whose hidden width ``h`` gives it the
same parameter count as the memory layer (values included).

Shapes (defaults): batch 4 x 256 tokens, dim 512 (= value dim), 4 heads, top-32,
key_dim 256 (half the value dim, as in Memory Layers at Scale, Berges et al. 2024).

Measured per case (median over ``--repeats`` after warmup, wall clock, ms):

* ``fwd``: forward under ``torch.no_grad()``.
* ``fwd+bwd``: forward + backward of an MSE loss against a fixed random target.
* ``step``: the optimizer step alone, as in ``recipes/train.py``: dense ``AdamW`` for every
  non-value parameter plus lazy ``torch.optim.SparseAdam`` for the value table (the FFN:
  ``AdamW`` for everything).
* ``fwd+bwd+step``: one full training step (zero_grad, forward, backward, both steps).
* ``+SparseSGD``: the same training step with :class:`knowedit.kernels.SparseSGD`
  (torch backend) instead of ``SparseAdam`` for the values.
* ``rows``: distinct value rows touched per step (``values.grad._nnz()``).
* ``peak RSS``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the process that ran the
  case. Every case runs in its own subprocess, so the number is per case and an
  out-of-memory kill of one case is reported instead of ending the run.

A dense FFN that is predicted not to fit (``--ffn-budget-s`` of wall time, from a GEMM
probe's GFLOP/s, or 85% of ``MemAvailable``) is reported as skipped, with the reason.

Usage::

    python bench/memory_scaling.py                        # 2^12, 2^16, 2^20; ~75 s on 2 idle cores
    python bench/memory_scaling.py --quick                # fewer repeats
    python bench/memory_scaling.py --sizes 12 16 --repeats 5 --threads 2 --json-out m.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_RESULT_TAG = "MEMORY_SCALING_RESULT "
# Other processes using more than this many cores beyond those the benchmark leaves free
# (nproc - threads) while a case runs inflate its timings.
_BUSY_CORES = 0.3


# --------------------------------------------------------------------------- helpers


def _median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_times() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _OtherLoad:
    """CPU used by processes other than this benchmark (and its workers), in cores."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.busy, self.steal = _cpu_times()
        self.ours = _children_cpu() + _self_cpu()

    def cores(self) -> tuple[float, float]:
        """(other processes' busy cores, stolen cores) averaged since construction."""
        wall = max(time.perf_counter() - self.t, 1e-9)
        busy, steal = _cpu_times()
        ours = _children_cpu() + _self_cpu()
        other = (busy - self.busy) - (ours - self.ours)
        return max(other, 0.0) / wall, (steal - self.steal) / wall


def _wait_idle(max_wait_s: float, threshold: float, window_s: float = 3.0) -> float:
    """Wait (at most ``max_wait_s``) until other processes use < ``threshold`` cores.

    Returns:
        The other processes' load (cores) over the last window.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = _OtherLoad()
        time.sleep(window_s)
        other = probe.cores()[0]
        if other < threshold or time.monotonic() >= deadline:
            return other


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_layer_params(n_keys: int, dim: int, heads: int, key_dim: int) -> int:
    """Parameters of ProductKeyMemory (swilu) + its ValuePool with value_dim == dim."""
    query = dim * heads * key_dim
    keys = heads * 2 * n_keys * (key_dim // 2)
    gate_out = 2 * dim * dim
    values = n_keys**2 * dim
    return query + keys + gate_out + values


def _ffn_hidden(params: int, dim: int) -> int:
    """Hidden width h with 2*d*h + h + d (weights + biases) closest to ``params``."""
    return max(1, round((params - dim) / (2 * dim + 1)))


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


# --------------------------------------------------------------------------- workers


def _time_case(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    make_opts: dict[str, Any],
    warmup: int,
    repeats: int,
    values: nn.Parameter | None,
    max_seconds: float,
) -> dict[str, Any]:
    """Time forward, fwd+bwd and fwd+bwd+step for each optimizer set in ``make_opts``."""
    res: dict[str, Any] = {}

    def out_of_time(start: float, done: int) -> bool:
        return done >= 3 and time.perf_counter() - start > max_seconds

    # forward (inference)
    fwd: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            t = time.perf_counter() - t0
            if i >= warmup:
                fwd.append(t)
                if out_of_time(start, len(fwd)):
                    break
    res["fwd_ms"] = _median_ms(fwd)
    res["fwd_repeats"] = len(fwd)

    for name, make in make_opts.items():
        opts = make()
        fb: list[float] = []
        step: list[float] = []
        total: list[float] = []
        rows: list[int] = []
        start = time.perf_counter()
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss = _loss(model(x), target)
            loss.backward()
            t1 = time.perf_counter()
            for o in opts:
                o.step()
            t2 = time.perf_counter()
            if i >= warmup:
                fb.append(t1 - t0)
                step.append(t2 - t1)
                total.append(t2 - t0)
                if values is not None and values.grad is not None and values.grad.is_sparse:
                    rows.append(int(values.grad._nnz()))
                if out_of_time(start, len(total)):
                    break
        res[f"{name}_fwd_bwd_ms"] = _median_ms(fb)
        res[f"{name}_step_ms"] = _median_ms(step)
        res[f"{name}_train_ms"] = _median_ms(total)
        res[f"{name}_repeats"] = len(total)
        if rows:
            res["unique_rows"] = int(statistics.median(rows))
        del opts
        for p in model.parameters():
            p.grad = None
    # fwd+bwd without any step is the same work in every optimizer run; report the first.
    first = next(iter(make_opts))
    res["fwd_bwd_ms"] = res[f"{first}_fwd_bwd_ms"]
    return res


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    from knowedit.config import MemoryConfig
    from knowedit.kernels import SparseSGD
    from knowedit.memory import ProductKeyMemory, ValuePool

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    b, t, d = spec["batch"], spec["seq"], spec["dim"]
    x = torch.randn(b, t, d)
    target = torch.randn(b, t, d)
    lr, value_lr = 1e-4, 1e-3  # Berges et al.: values 10x the rest
    out: dict[str, Any] = {"threads": torch.get_num_threads()}

    if spec["kind"] == "memory":
        cfg = MemoryConfig(
            n_keys=spec["n_keys"],
            heads=spec["heads"],
            topk=spec["topk"],
            key_dim=spec["key_dim"],
            value_dim=d,
            backend="torch",
        )
        pool = ValuePool(spec["n_keys"] ** 2, d)
        model = ProductKeyMemory(d, cfg, pool, layer=0)
        values = pool.values
        others = [p for n, p in model.named_parameters() if not n.startswith("pool.")]
        out["params"] = sum(p.numel() for p in model.parameters())
        out["value_rows"] = values.shape[0]
        make_opts = {
            "sparse_adam": lambda: [
                torch.optim.AdamW(others, lr=lr),
                torch.optim.SparseAdam([values], lr=value_lr),
            ],
            "sparse_sgd": lambda: [
                torch.optim.AdamW(others, lr=lr),
                SparseSGD([values], lr=value_lr, backend="torch"),
            ],
        }
    else:
        h = spec["hidden"]
        model = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        values = None
        out["params"] = sum(p.numel() for p in model.parameters())
        out["hidden"] = h
        make_opts = {"adamw": lambda: [torch.optim.AdamW(model.parameters(), lr=lr)]}

    out["rss_after_build_mib"] = _peak_rss_mib()
    out.update(
        _time_case(
            model,
            x,
            target,
            make_opts,
            spec["warmup"],
            spec["repeats"],
            values,
            spec["max_seconds"],
        )
    )
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; failures become ``{"skipped": reason}``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
        if proc.returncode == -9:
            why += " (likely the out-of-memory killer)"
    else:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"exit {proc.returncode}: {tail[:200]}"
    return {"skipped": why}


# --------------------------------------------------------------------------- driver


def _gemm_gflops(dim: int, tokens: int) -> float:
    """GFLOP/s of a (tokens x dim) @ (dim x 8192) fp32 matmul, the FFN's shape."""
    a = torch.randn(tokens, dim)
    w = torch.randn(dim, 8192)
    for _ in range(2):
        a @ w
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ w
        ts.append(time.perf_counter() - t0)
    return 2 * tokens * dim * 8192 / statistics.median(ts) / 1e9


def _ffn_skip_reason(
    params: int, hidden: int, tokens: int, dim: int, gflops: float, args: argparse.Namespace
) -> str | None:
    # fwd ~ 2*T*P flops, fwd+bwd ~ 6*T*P; the case runs warmup+repeats of each, the
    # training step once per optimizer run.
    iters = args.warmup + args.repeats
    flops = iters * (2 + 6) * tokens * params
    pred_s = flops / (gflops * 1e9)
    per_step_s = 6 * tokens * params / (gflops * 1e9)
    if pred_s > args.ffn_budget_s:
        return (
            f"predicted ~{per_step_s:.0f} s per fwd+bwd (6*T*P = {6 * tokens * params / 1e12:.1f}"
            f" TFLOP at {gflops:.0f} GFLOP/s from a GEMM probe), ~{pred_s:.0f} s for the case;"
            f" over --ffn-budget-s {args.ffn_budget_s:.0f}"
        )
    # weights + grad + 2 AdamW states, plus ~5 (T x h) activation-sized buffers in fwd+bwd
    need = 4 * (4 * params + 5 * tokens * hidden)
    avail = _mem_available_bytes()
    if avail is not None and need > 0.85 * avail:
        return (
            f"predicted {need / 2**30:.1f} GiB (weights, grads, AdamW state, activations)"
            f" > 85% of MemAvailable {avail / 2**30:.1f} GiB"
        )
    return None


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _size_label(n: int) -> str:
    if n >= 2**20:
        return f"{n // 2**20}M"
    if n >= 2**10:
        return f"{n // 2**10}K"
    return str(n)


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N (rows) | layer | params | fwd ms | fwd+bwd ms | step ms | fwd+bwd+step ms "
        "| fwd+bwd+step ms (SparseSGD values) | unique rows/step | peak RSS GiB | other CPU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        n = f"2^{r['log2_n']} ({_size_label(2 ** r['log2_n'])})"
        if "skipped" in r:
            lines.append(
                f"| {n} | {r['label']} | {r['params'] / 1e6:.1f}M | skipped: {r['skipped']} "
                "| | | | | | | |"
            )
            continue
        if r["kind"] == "memory":
            train = r["sparse_adam_train_ms"]
            step = r["sparse_adam_step_ms"]
            sgd = r.get("sparse_sgd_train_ms")
            uniq = r.get("unique_rows")
            uniq_s = f"{uniq:,} ({100 * uniq / 2 ** r['log2_n']:.1f}%)" if uniq else "—"
        else:
            train, step, sgd, uniq_s = r["adamw_train_ms"], r["adamw_step_ms"], None, "all"
        lines.append(
            f"| {n} | {r['label']} | {r['params'] / 1e6:.1f}M | {_fmt(r['fwd_ms'])} "
            f"| {_fmt(r['fwd_bwd_ms'])} | {_fmt(step)} | {_fmt(train)} | {_fmt(sgd)} "
            f"| {uniq_s} | {r['peak_rss_mib'] / 1024:.2f} | {r['other_cpu_cores']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[12, 16, 20],
        help="log2 of the value rows N (even: n_keys = 2^(s/2)); default 12 16 20",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement (default 7, --quick 3)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="warmup iterations (default 3, --quick 1)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (default: torch's default)"
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats and warmup")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--key-dim", type=int, default=256)
    p.add_argument("--no-ffn", action="store_true", help="skip the dense FFN comparison")
    p.add_argument(
        "--ffn-budget-s",
        type=float,
        default=60.0,
        help="skip an FFN case predicted to take longer than this (s)",
    )
    p.add_argument(
        "--case-seconds",
        type=float,
        default=15.0,
        help="stop repeating one measurement after this much time (>= 3 repeats)",
    )
    p.add_argument(
        "--retry-busy",
        type=int,
        default=0,
        help="rerun a case (up to this many times) when other processes used more than "
        f"nproc - threads + {_BUSY_CORES} cores while it ran",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each case wait up to this many seconds for other processes "
        f"to go quiet (< nproc - threads + {_BUSY_CORES} cores); 0: don't wait",
    )
    p.add_argument("--json-out", type=str, default=None, help="write results as JSON here")
    p.add_argument("--_worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker is not None:
        res = _worker(json.loads(args._worker))
        print(_RESULT_TAG + json.dumps(res), flush=True)
        return

    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    for s in args.sizes:
        if s % 2 or s < 2:
            p.error(f"--sizes must be even log2 values (n_keys = 2^(s/2)), got {s}")
    if args.threads:
        torch.set_num_threads(args.threads)

    tokens = args.batch * args.seq
    layer = {k: getattr(args, k) for k in ("batch", "seq", "dim", "heads", "topk", "key_dim")}
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "bench/memory_scaling.py", *sys.argv[1:]]),
        "shape": {**layer, "dtype": "float32", "backend": "torch"},
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    spare = max(0, (os.cpu_count() or 1) - torch.get_num_threads())
    busy_limit = spare + _BUSY_CORES
    meta["busy_limit_cores"] = busy_limit
    if args.wait_idle:
        _wait_idle(args.wait_idle, busy_limit)
    gflops = _gemm_gflops(args.dim, tokens)
    meta["gemm_gflops"] = round(gflops, 1)
    print(
        f"# {meta['cpu']}, nproc {meta['nproc']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, GEMM probe {gflops:.0f} GFLOP/s",
        file=sys.stderr,
    )

    common = {
        **layer,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "max_seconds": args.case_seconds,
    }
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for s in args.sizes:
        n_keys = 2 ** (s // 2)
        mem_params = _memory_layer_params(n_keys, args.dim, args.heads, args.key_dim)
        cases = [("memory", "memory (PKM)", None)]
        if not args.no_ffn:
            cases.append(("ffn", "", _ffn_hidden(mem_params, args.dim)))
        for kind, label, hidden in cases:
            spec = {**common, "kind": kind, "n_keys": n_keys, "hidden": hidden}
            row: dict[str, Any] = {"log2_n": s, "kind": kind, "n_keys": n_keys}
            if kind == "ffn":
                row["label"] = f"dense FFN (h={hidden:,})"
                params = 2 * args.dim * hidden + hidden + args.dim
                row["params"] = params
                reason = _ffn_skip_reason(params, hidden, tokens, args.dim, gflops, args)
                if reason:
                    row["skipped"] = reason
                    rows.append(row)
                    print(f"# 2^{s} {kind}: skipped ({reason})", file=sys.stderr)
                    continue
            else:
                row["label"] = label
                row["params"] = mem_params
            for attempt in range(args.retry_busy + 1):
                if args.wait_idle:
                    _wait_idle(args.wait_idle, busy_limit)
                t0 = time.perf_counter()
                load = _OtherLoad()
                res = _run_worker(spec, timeout_s=max(120.0, 4 * args.ffn_budget_s))
                other, steal = load.cores()
                print(
                    f"# 2^{s} {kind}: {time.perf_counter() - t0:.1f} s, other processes "
                    f"{other:.2f} cores, steal {steal:.2f}",
                    file=sys.stderr,
                )
                if other < busy_limit or "skipped" in res or attempt == args.retry_busy:
                    break
            row.update(res)
            row["other_cpu_cores"] = round(other, 2)
            row["steal_cores"] = round(steal, 2)
            row["attempts"] = attempt + 1
            rows.append(row)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)

    print(_table(rows))
    print(
        f"\nmedian ms; {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; "
        f"batch {args.batch}x{args.seq}, dim {args.dim}, {args.heads} heads, top-{args.topk}, "
        f"key_dim {args.key_dim}, fp32; total {meta['total_s']} s; 'other CPU' = cores used by "
        f"other processes while the case ran (> {busy_limit:.1f} inflates the timings)"
    )
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
