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

``--peer`` instead compares the layer with lucidrains' ``product-key-memory`` 0.3.0 (the
"peer", an optional bench dependency: ``pip install --no-deps product-key-memory==0.3.0
einops colt5-attention local-attention hyper-connections``; if it is missing, the bench
says so first and last and times knowedit alone). Both run in THIS process, one torch thread, interleaved (every repeat
times each contender once, the order rotating), on the same input: batch 4 x 256, dim 512,
4 heads, top-32, key dim 256 (the peer's ``dim_head`` 128 per half), a squared-output loss
``out.pow(2).mean()`` and plain ``torch.optim.SGD`` on every parameter (knowedit's value
gradient is sparse, the peer's dense). knowedit runs without and with Memory+ (swilu gate,
qk-norm); the peer has neither and runs once per repeat. Default sizes 2^12, 2^16, 2^20,
2^22; a size whose peer (values + dense gradient) does not fit in ``MemAvailable`` is
measured for knowedit alone. With 2^16 and 2^22 both in ``--sizes``, knowedit's training
step is then timed once more at those two sizes interleaved in one loop, so that a change
in other processes' load between sizes does not pass for growth. It also reports a
memory-traffic floor:

* ``fwd floor = 4 B * (T*H*k*D + T*d + T*D + d*H*Dk + H*n*Dk) / BW``: every gathered
  value row (T tokens x H heads x top-k rows of D floats), the input and output, the query
  weights and the sub-keys, each read or written once;
* ``step floor = fwd bytes + 4 B * (T*H*k*D + 4*U*D + 3*P) / BW``: the weight-gradient
  pass reads every gathered row again, the U distinct rows' gradient is written, SGD reads
  it and reads and writes those U value rows, and the P dense parameters are read, their
  gradient written and read, and written back;

with ``BW`` the single-thread copy bandwidth measured in the same process (bytes read +
written per second by ``dst.copy_(src)`` on 256 MiB).

Usage::

    python bench/memory_scaling.py                        # 2^12, 2^16, 2^20; ~75 s on 2 idle cores
    python bench/memory_scaling.py --quick                # fewer repeats
    python bench/memory_scaling.py --sizes 12 16 --repeats 5 --threads 2 --json-out m.json
    python bench/memory_scaling.py --peer                 # vs product-key-memory, 1 thread
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


# --------------------------------------------------------------------------- peer comparison

_PEER_HINT = (
    "pip install --no-deps product-key-memory==0.3.0 einops colt5-attention "
    "local-attention hyper-connections"
)


def _import_peer() -> tuple[Any, str]:
    """(the peer's PKM class or None, its version or why it could not be imported)."""
    try:
        import importlib.metadata as md

        from product_key_memory import PKM
    except ImportError as e:
        return None, str(e)
    return PKM, md.version("product-key-memory")


def _copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Single-thread copy bandwidth, bytes read + written per second (``dst.copy_(src)``)."""
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(ts)


def _floor_bytes(
    args: argparse.Namespace, n_keys: int, unique_rows: int, dense_params: int
) -> tuple[int, int]:
    """(forward bytes, fwd+bwd+step bytes) of the memory-traffic floor (see the docstring)."""
    t = args.batch * args.seq
    d, h, k, dk = args.dim, args.heads, args.topk, args.key_dim
    rows = t * h * k * d  # every gathered value element
    fwd = 4 * (rows + t * d + t * d + d * h * dk + h * n_keys * dk)
    step = fwd + 4 * (rows + 4 * unique_rows * d + 3 * dense_params)
    return fwd, step


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


def _peer_size(
    s: int, args: argparse.Namespace, pkm_cls: Any, bw: float, missing: str | None = None
) -> list[dict[str, Any]]:
    """Time knowedit (plain and Memory+) and the peer at N = 2^s, interleaved."""
    from knowedit.config import MemoryConfig
    from knowedit.memory import ProductKeyMemory, ValuePool

    n_keys = 2 ** (s // 2)
    n = n_keys**2
    d = args.dim
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, d)
    # One value pool serves both knowedit variants (a pool may be shared between layers):
    # the timings do not depend on the values, and 4M x 512 fp32 is 8 GiB.
    pool = ValuePool(n, d)
    lr = 1e-3
    contenders: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for plus in (False, True):
        cfg = MemoryConfig(
            n_keys=n_keys,
            heads=args.heads,
            topk=args.topk,
            key_dim=args.key_dim,
            value_dim=d,
            swilu=plus,
            qk_norm=plus,
            backend="torch",
        )
        model = ProductKeyMemory(d, cfg, pool, layer=0)
        contenders["knowedit+" if plus else "knowedit"] = (
            model,
            torch.optim.SGD(model.parameters(), lr=lr),
        )
    # The peer needs its (N, d) values and a dense (N, d) gradient, plus ~1 GiB of slack.
    peer_need = 2 * n * d * 4 + (1 << 30)
    avail = _mem_available_bytes()
    peer_skip = None
    if pkm_cls is None:
        peer_skip = missing
    elif args.topk > n_keys:
        peer_skip = f"peer not run: its top-{args.topk} needs at least as many keys, has {n_keys}"
    elif avail is not None and peer_need > avail:
        peer_skip = (
            f"peer not run: its values + dense gradient need {peer_need / 2**30:.1f} GiB, "
            f"MemAvailable {avail / 2**30:.1f} GiB beside knowedit's {n * d * 4 / 2**30:.1f} GiB table"
        )
        print(f"# 2^{s}: {peer_skip}", file=sys.stderr)
    else:
        peer = pkm_cls(
            d, heads=args.heads, num_keys=n_keys, topk=args.topk, dim_head=args.key_dim // 2
        )
        contenders["peer"] = (peer, torch.optim.SGD(peer.parameters(), lr=lr))

    fwd: dict[str, list[float]] = {name: [] for name in contenders}
    step: dict[str, list[float]] = {name: [] for name in contenders}
    uniq: dict[str, list[int]] = {name: [] for name in contenders}
    names = list(contenders)
    load = _OtherLoad()
    for i in range(args.warmup + args.repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            model, opt = contenders[name]
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            t1 = time.perf_counter()
            _train_step(model, opt, x)
            t2 = time.perf_counter()
            if i >= args.warmup:
                fwd[name].append(t1 - t0)
                step[name].append(t2 - t1)
                if name != "peer" and pool.values.grad is not None:
                    uniq[name].append(int(pool.values.grad._nnz()))
    other, steal = load.cores()
    print(f"# 2^{s}: other processes {other:.2f} cores, steal {steal:.2f}", file=sys.stderr)

    rows = []
    for name in ("knowedit", "knowedit+"):
        model = contenders[name][0]
        u = int(statistics.median(uniq[name]))
        dense = sum(p.numel() for p in model.parameters() if p is not pool.values)
        fwd_b, step_b = _floor_bytes(args, n_keys, u, dense)
        row: dict[str, Any] = {
            "log2_n": s,
            "memory_plus": name == "knowedit+",
            "fwd_ms": _median_ms(fwd[name]),
            "train_ms": _median_ms(step[name]),
            "unique_rows": u,
            "fwd_floor_ms": 1e3 * fwd_b / bw,
            "train_floor_ms": 1e3 * step_b / bw,
            "fwd_ms_all": [round(1e3 * v, 1) for v in fwd[name]],
            "train_ms_all": [round(1e3 * v, 1) for v in step[name]],
            "other_cpu_cores": round(other, 2),
            "steal_cores": round(steal, 2),
        }
        if "peer" in contenders:
            row["peer_fwd_ms"] = _median_ms(fwd["peer"])
            row["peer_train_ms"] = _median_ms(step["peer"])
            row["peer_fwd_ms_all"] = [round(1e3 * v, 1) for v in fwd["peer"]]
            row["peer_train_ms_all"] = [round(1e3 * v, 1) for v in step["peer"]]
        else:
            row["peer_skipped"] = peer_skip
        rows.append(row)
    del contenders, pool
    return rows


def _growth_check(args: argparse.Namespace, small: int, large: int) -> dict[str, Any]:
    """knowedit's fwd+bwd+step at 2^small and 2^large slots, the two sizes interleaved in
    one loop (load from other processes then hits both alike), without and with Memory+."""
    from knowedit.config import MemoryConfig
    from knowedit.memory import ProductKeyMemory, ValuePool

    d = args.dim
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, d)
    models: dict[tuple[int, bool], tuple[nn.Module, torch.optim.Optimizer]] = {}
    for s in (small, large):
        n_keys = 2 ** (s // 2)
        pool = ValuePool(n_keys**2, d)
        for plus in (False, True):
            cfg = MemoryConfig(
                n_keys=n_keys,
                heads=args.heads,
                topk=args.topk,
                key_dim=args.key_dim,
                value_dim=d,
                swilu=plus,
                qk_norm=plus,
                backend="torch",
            )
            model = ProductKeyMemory(d, cfg, pool, layer=0)
            models[(s, plus)] = (model, torch.optim.SGD(model.parameters(), lr=1e-3))
    times: dict[tuple[int, bool], list[float]] = {key: [] for key in models}
    keys = list(models)
    load = _OtherLoad()
    for i in range(args.warmup + args.repeats):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            model, opt = models[key]
            t0 = time.perf_counter()
            _train_step(model, opt, x)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    other, _ = load.cores()
    out: dict[str, Any] = {"small": small, "large": large, "other_cpu_cores": round(other, 2)}
    for plus in (False, True):
        tag = "plus" if plus else "plain"
        out[f"{tag}_small_ms"] = _median_ms(times[(small, plus)])
        out[f"{tag}_large_ms"] = _median_ms(times[(large, plus)])
    return out


def _peer_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| N (slots) | Memory+ | fwd ms knowedit / peer | fwd+bwd+step ms knowedit / peer "
        "| step speed-up (peer / knowedit) | unique rows | fwd floor ms (fwd / floor) "
        "| step floor ms (step / floor) | other CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = "peer" if "peer_fwd_ms" in r else None
        pf = f"{r['peer_fwd_ms']:.1f}" if peer else "not run"
        pt = f"{r['peer_train_ms']:.1f}" if peer else "not run"
        ratio = f"{r['peer_train_ms'] / r['train_ms']:.2f}x" if peer else "—"
        lines.append(
            f"| 2^{r['log2_n']} ({_size_label(2 ** r['log2_n'])}) | {'on' if r['memory_plus'] else 'off'} "
            f"| {r['fwd_ms']:.1f} / {pf} | {r['train_ms']:.1f} / {pt} | {ratio} "
            f"| {r['unique_rows']:,} | {r['fwd_floor_ms']:.1f} ({r['fwd_ms'] / r['fwd_floor_ms']:.1f}x) "
            f"| {r['train_floor_ms']:.1f} ({r['train_ms'] / r['train_floor_ms']:.1f}x) "
            f"| {r['other_cpu_cores']:.2f} |"
        )
    return "\n".join(lines)


def _peer_acceptance(rows: list[dict[str, Any]], growth: dict[str, Any] | None = None) -> list[str]:
    """The issue's three acceptance checks, each with its numbers."""
    out = []
    for tag in ("plain", "plus") if growth else ():
        g = growth[f"{tag}_large_ms"] / growth[f"{tag}_small_ms"]
        out.append(
            f"knowedit step growth {_size_label(2 ** growth['small'])} -> "
            f"{_size_label(2 ** growth['large'])} <= 1.5x, the two sizes interleaved (Memory+ "
            f"{'on' if tag == 'plus' else 'off'}): {'MET' if g <= 1.5 else 'NOT MET'} "
            f"({growth[f'{tag}_small_ms']:.0f} -> {growth[f'{tag}_large_ms']:.0f} ms, {g:.2f}x; "
            f"other CPU {growth['other_cpu_cores']:.2f})"
        )
    with_peer = [r for r in rows if "peer_train_ms" in r]
    if with_peer:
        worst = min(with_peer, key=lambda r: r["peer_train_ms"] / r["train_ms"])
        ratio = worst["peer_train_ms"] / worst["train_ms"]
        out.append(
            f"fwd+bwd+step >= 2x faster than the peer at every size with the peer: "
            f"{'MET' if ratio >= 2 else 'NOT MET'} (worst {ratio:.2f}x at "
            f"2^{worst['log2_n']}, Memory+ {'on' if worst['memory_plus'] else 'off'})"
        )
    for plus in (False, True):
        by = {r["log2_n"]: r for r in rows if r["memory_plus"] == plus}
        if 16 in by and 22 in by:
            g = by[22]["train_ms"] / by[16]["train_ms"]
            out.append(
                f"knowedit step growth 64K -> 4M <= 1.5x, sizes run one after the other "
                f"(Memory+ {'on' if plus else 'off'}): "
                f"{'MET' if g <= 1.5 else 'NOT MET'} ({by[16]['train_ms']:.0f} -> "
                f"{by[22]['train_ms']:.0f} ms, {g:.2f}x)"
            )
        if 20 in by:
            f = by[20]["fwd_ms"] / by[20]["fwd_floor_ms"]
            out.append(
                f"forward at 1M within 3x of the memory-traffic floor (Memory+ "
                f"{'on' if plus else 'off'}): {'MET' if f <= 3 else 'NOT MET'} "
                f"({by[20]['fwd_ms']:.1f} ms vs floor {by[20]['fwd_floor_ms']:.1f} ms, {f:.1f}x)"
            )
    return out


def _use_reference_paths() -> None:
    """Run knowedit on its reference top-k and lookup (what the torch backend was before the
    embedding-bag path): ``product_topk_ref`` and ``memory_lookup_ref``."""
    import knowedit.memory as memory
    from knowedit.kernels import memory_lookup_ref

    memory.product_topk = memory.product_topk_ref
    memory.lookup = lambda values, ids, weights, backend: memory_lookup_ref(values, ids, weights)


def _peer_main(args: argparse.Namespace) -> None:
    if args.knowedit_ref:
        _use_reference_paths()
    pkm_cls, version = _import_peer()
    missing = None
    if pkm_cls is None:
        # Still time knowedit (and its floor), so the command runs anywhere; say it loudly.
        missing = (
            f"PEER MISSING: product-key-memory 0.3.0 is not installed ({version}); knowedit "
            f"is timed alone. Install the peer with: {_PEER_HINT}"
        )
        print(f"# {missing}", file=sys.stderr)
        version = "not installed"
    torch.set_num_threads(args.threads or 1)
    bw = _copy_bandwidth()
    meta = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "peer": f"product-key-memory {version}",
        "knowedit_paths": "reference" if args.knowedit_ref else "fast",
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "bench/memory_scaling.py", *sys.argv[1:]]),
        "copy_bandwidth_gb_s": round(bw / 1e9, 2),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(
        f"# {meta['cpu']}, torch {meta['torch']}, {meta['peer']}, {meta['threads']} thread, "
        f"copy bandwidth {bw / 1e9:.1f} GB/s, knowedit {meta['knowedit_paths']} paths",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for s in args.sizes:
        if args.wait_idle:
            _wait_idle(args.wait_idle, max(0, (os.cpu_count() or 1) - 1) + _BUSY_CORES)
        rows.extend(_peer_size(s, args, pkm_cls, bw, missing))
        print(_peer_table(rows[-2:]).splitlines()[-2:][0], file=sys.stderr)
    growth = None
    if 16 in args.sizes and 22 in args.sizes:
        growth = _growth_check(args, 16, 22)
        print(f"# growth check: {growth}", file=sys.stderr)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    print(_peer_table(rows))
    print(
        f"\nmedian ms of {args.repeats} after {args.warmup} warmup; {meta['cpu']}, 1 thread, "
        f"torch {meta['torch']}, {meta['peer']}; batch {args.batch}x{args.seq}, dim {args.dim}, "
        f"{args.heads} heads, top-{args.topk}, key_dim {args.key_dim}, fp32, SGD; copy "
        f"bandwidth {bw / 1e9:.1f} GB/s; knowedit {meta['knowedit_paths']} paths; "
        f"total {meta['total_s']} s"
    )
    for r in rows:
        if "peer_skipped" in r and not r["memory_plus"]:
            print(f"2^{r['log2_n']}: {r['peer_skipped']}")
    for line in _peer_acceptance(rows, growth):
        print(line)
    if missing:
        print(missing)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "growth": growth}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="log2 of the value rows N (even: n_keys = 2^(s/2)); default 12 16 20 "
        "(--peer without --knowedit-ref: 12 16 20 22)",
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
        "--peer",
        action="store_true",
        help="compare with lucidrains' product-key-memory 0.3.0 in this process, interleaved, "
        "1 thread (default repeats 5, warmup 1)",
    )
    p.add_argument(
        "--knowedit-ref",
        action="store_true",
        help="with --peer: run knowedit on its reference top-k and lookup (the torch "
        "backend before the embedding-bag path), for before/after numbers; default sizes "
        "12 16 20",
    )
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

    if args.sizes is None:
        # The reference paths' step at 4M takes ~10 s: --knowedit-ref stops at 1M.
        args.sizes = [12, 16, 20, 22] if args.peer and not args.knowedit_ref else [12, 16, 20]
    if args.repeats is None:
        args.repeats = 3 if args.quick else (5 if args.peer else 7)
    if args.warmup is None:
        args.warmup = 1 if args.quick or args.peer else 3
    for s in args.sizes:
        if s % 2 or s < 2:
            p.error(f"--sizes must be even log2 values (n_keys = 2^(s/2)), got {s}")
    if args.peer:
        _peer_main(args)
        return
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
