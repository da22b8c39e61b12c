"""Backend resolution, import hygiene, ahead-of-time compilation and the bench smoke run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import knowedit.kernels as K
from knowedit.kernels import _common

from .conftest import INTERPRET

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter (TRITON_INTERPRET removed unless given)."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env["PYTHONSAFEPATH"] = "1"  # the checkout's knowedit/ folder must not shadow the install
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def no_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "triton_available", lambda: False)


def test_resolve_backend_torch_and_auto_cpu() -> None:
    assert K.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert K.resolve_backend("torch", "cuda") == "torch"
    assert K.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.resolve_backend("cuda", "cpu")


def test_resolve_backend_auto_cuda(no_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert K.resolve_backend("auto", "cuda") == "torch"  # triton missing
    monkeypatch.setattr(_common, "triton_available", lambda: True)
    assert K.resolve_backend("auto", "cuda") == "triton"
    assert K.resolve_backend("triton", "cuda") == "triton"


def test_resolve_backend_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        K.resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if K.triton_available():
        assert K.resolve_backend("triton", "cpu") == "triton"


def test_triton_missing_errors_are_clear(no_triton: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    values, indices, weights = torch.randn(4, 3), torch.tensor([[0, 3]]), torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.memory_lookup(values, indices, weights)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.lookup(values, indices, weights, backend="triton")
    grad = torch.sparse_coo_tensor(
        torch.tensor([[1]]), torch.ones(1, 3), (4, 3), check_invariants=True
    )
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.sparse_sgd_step_(values, grad, 0.1)
    torch.testing.assert_close(K.lookup(values, indices, weights), (values[0] + values[3])[None])


def test_import_and_torch_backend_without_triton() -> None:
    """``import knowedit.kernels`` must work where triton cannot be imported at all."""
    out = run_python(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import knowedit.kernels as K
        assert not K.triton_available()
        assert K.resolve_backend("auto", "cuda") == "torch"
        v = torch.nn.Parameter(torch.randn(5, 3))
        out = K.lookup(v, torch.tensor([[1, 4, 1]]), torch.ones(1, 3))
        out.sum().backward()
        assert v.grad.is_sparse
        K.SparseSGD([v], lr=0.1).step()
        try:
            K.memory_lookup(v, torch.tensor([[1]]), torch.ones(1, 1))
        except RuntimeError as exc:
            print("RuntimeError:", exc)
        """
    )
    assert "RuntimeError: Triton kernels requested but triton is not importable" in out


@pytest.mark.skipif(not K.triton_available(), reason="needs triton")
def test_interpreter_env_order() -> None:
    """TRITON_INTERPRET may be set after torch/knowedit.kernels imports, not after triton's."""
    out = run_python(
        """
        import os, sys
        import torch
        import knowedit.kernels as K
        assert "triton" not in sys.modules  # importing the package does not import triton
        os.environ["TRITON_INTERPRET"] = "1"
        v = torch.randn(6, 5, requires_grad=True)
        idx = torch.tensor([[0, 5, 5], [2, 2, 1]])
        w = torch.rand(2, 3)
        torch.testing.assert_close(K.memory_lookup(v, idx, w), K.memory_lookup_ref(v, idx, w))
        print("interpreted ok")
        """
    )
    assert "interpreted ok" in out
    out = run_python(
        """
        import os
        import torch, triton
        import knowedit.kernels as K
        os.environ["TRITON_INTERPRET"] = "1"  # too late: triton's own helpers are compiled
        try:
            K.memory_lookup(torch.randn(3, 2), torch.tensor([[0]]), torch.ones(1, 1))
        except RuntimeError as exc:
            print("RuntimeError:", exc)
        """
    )
    assert "RuntimeError:" in out and "before triton is imported" in out


NVIDIA_BACKEND = (
    importlib.util.find_spec("triton") is not None
    and (
        Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/ptxas"
    ).exists()
)


@pytest.mark.skipif(not NVIDIA_BACKEND, reason="needs triton's NVIDIA backend (ptxas)")
def test_kernels_compile_for_sm90_without_gpu(tmp_path: Path) -> None:
    """The interpreter does not type-check like the compiler; compile every kernel to sm_90."""
    out = run_python(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from knowedit.kernels._common import load_triton_module
        L = load_triton_module("_lookup_triton")
        O = load_triton_module("_optim_triton")
        target = GPUTarget("cuda", 90, 32)
        C = "constexpr"
        for vt in ("*bf16", "*fp16", "*fp32"):
            for wt in ("*fp32",) if vt == "*fp32" else ("*fp32", vt):
                table = {"values_ptr": vt, "idx_ptr": "*i64"}
                kernels = [
                    (L.lookup_fwd_kernel, {**table, "w_ptr": wt, "out_ptr": vt, "K": "i32",
                     "D": "i32", "stride_vn": "i64", "BLOCK_K": C, "BLOCK_D": C},
                     {"BLOCK_K": 16, "BLOCK_D": 256}),
                    (L.lookup_bwd_weights_kernel, {**table, "gout_ptr": vt, "gw_ptr": wt,
                     "K": "i32", "D": "i32", "stride_vn": "i64", "BLOCK_K": C, "BLOCK_D": C},
                     {"BLOCK_K": 16, "BLOCK_D": 256}),
                    (L.lookup_bwd_values_kernel, {"gout_ptr": vt, "w_ptr": wt, "perm_ptr": "*i64",
                     "seg_ptr": "*i64", "grows_ptr": vt, "K": "i32", "D": "i32", "BLOCK_S": C,
                     "BLOCK_D": C}, {"BLOCK_S": 8, "BLOCK_D": 512}),
                ]
                if wt == "*fp32":
                    strides = {"stride_vn": "i64", "stride_vd": "i32", "stride_gn": "i32"}
                    kernels += [
                        (O.sparse_sgd_kernel, {"values_ptr": vt, "rows_ptr": "*i64",
                         "grad_ptr": vt, "lr": "fp32", "D": "i32", **strides, "BLOCK_D": C},
                         {"BLOCK_D": 1024}),
                        (O.rowwise_adagrad_kernel, {"values_ptr": vt, "state_ptr": "*fp32",
                         "rows_ptr": "*i64", "grad_ptr": vt, "lr": "fp32", "eps": "fp32",
                         "D": "i32", **strides, "BLOCK_D": C}, {"BLOCK_D": 2048}),
                    ]
                for fn, sig, consts in kernels:
                    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                       target=target, options={"num_warps": 4})
                    assert len(k.asm["cubin"]) > 0
                    print("compiled", fn.__name__, vt, wt)
        """,
        env={"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"},
    )
    assert out.count("compiled") == 8 + 8 + 5  # bf16/fp16 with two weight dtypes, fp32


def test_bench_smoke(tmp_path: Path) -> None:
    json_out = tmp_path / "bench.json"
    env = {"TRITON_INTERPRET": "1"} if INTERPRET else {}
    cmd = [sys.executable, str(REPO / "bench" / "lookup_kernels.py"), "--smoke", "--reps", "1"]
    cmd += ["--n-log2", "6", "--json-out", str(json_out)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| N | method | phase |" in proc.stdout
    result = json.loads(json_out.read_text())
    methods = {(r["method"], r["phase"], r["step"]) for r in result["rows"]}
    expected = {
        ("torch-ref", "forward+backward+step", "adagrad"),
        ("embedding_bag", "forward", "-"),
        ("gather-dense", "forward+backward+step", "adam"),
    }
    if INTERPRET and K.triton_available():
        expected |= {("triton", phase, "-") for phase in ("forward", "forward+backward")}
        expected |= {("triton", "forward+backward+step", step) for step in ("sgd", "adagrad")}
    assert expected <= methods
    assert all(r["ms"] > 0 and r["x_floor"] > 0 for r in result["rows"])
