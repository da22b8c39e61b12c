"""Fused sparse optimizer steps and the optimizer classes.

Checks: the Triton steps equal the closed-form update on touched rows, agree with the
``*_ref`` references, and leave every other row (and accumulator entry) bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from knowedit.kernels import (
    RowwiseAdagrad,
    SparseSGD,
    lookup,
    rowwise_adagrad_step_,
    rowwise_adagrad_step_ref,
    sparse_sgd_step_,
    sparse_sgd_step_ref,
)

from .conftest import INTERPRET

# The interpreter rounds fp32 -> bf16/fp16 stores toward zero (GPUs round to nearest), so
# half-precision results may differ from torch's by one ulp.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEEDS_INTERPRETER = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
TRITON_BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern of a float tensor (so -0.0 != 0.0 and NaN payloads count)."""
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(int_type)


def sparse_grad(
    n: int, d: int, rows: list[int], dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randn(len(rows), d, generator=gen).to(dtype)
    idx = torch.tensor([rows], dtype=torch.int64)
    return torch.sparse_coo_tensor(idx, vals, (n, d), check_invariants=True).coalesce().to(device)


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-12)
    assert float((actual - expected).abs().max() / scale) < TOL[dtype]


def touched_mask(n: int, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    return mask


ROWS = [0, 3, 4, 17, 38, 39]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [37, 1100], ids=["D37", "D1100-multitile"])
def test_sparse_sgd_step(device: torch.device, dtype: torch.dtype, d: int) -> None:
    n, lr = 40, 0.3
    values = torch.randn(n, d).to(dtype).to(device)
    grad = sparse_grad(n, d, ROWS, dtype, device)
    fused, ref = values.clone(), values.clone()
    sparse_sgd_step_(fused, grad, lr)
    sparse_sgd_step_ref(ref, grad, lr)

    touched = touched_mask(n, ROWS).to(device)
    expected = (values.float() - lr * grad.to_dense().float()).to(dtype)
    assert_rows_close(fused[touched], expected[touched], dtype)
    assert_rows_close(ref[touched], expected[touched], dtype)
    assert not torch.equal(fused[touched], values[touched])
    assert torch.equal(bits(fused[~touched]), bits(values[~touched]))
    assert torch.equal(bits(ref[~touched]), bits(values[~touched]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [37, 2100], ids=["D37", "D2100-multitile"])
def test_rowwise_adagrad_step(device: torch.device, dtype: torch.dtype, d: int) -> None:
    n, lr, eps = 40, 0.1, 1e-10
    values = torch.randn(n, d).to(dtype).to(device)
    state0 = torch.rand(n, device=device)
    state0[3] = 0.0  # fresh row: first update has magnitude ~lr / rms(g)
    touched = touched_mask(n, ROWS).to(device)
    for step_fn in (rowwise_adagrad_step_, rowwise_adagrad_step_ref):
        v, s = values.clone(), state0.clone()
        for step in range(2):  # the second step starts from an updated accumulator
            v_prev, s_prev = v.clone(), s.clone()
            grad = sparse_grad(n, d, ROWS, dtype, device, seed=step)
            step_fn(v, s, grad, lr, eps)
            g = grad.to_dense().float()
            expected_s = s_prev + g.square().mean(1) * touched
            expected_v = v_prev.float() - g * (lr / (expected_s.sqrt() + eps)).unsqueeze(1)
            assert torch.allclose(s, expected_s, rtol=1e-6, atol=0)
            assert_rows_close(v[touched], expected_v[touched], dtype)
            assert not torch.equal(v[touched], v_prev[touched])
        assert torch.equal(bits(v[~touched]), bits(values[~touched]))
        assert torch.equal(bits(s[~touched]), bits(state0[~touched]))


@pytest.mark.parametrize("step", ["sgd", "adagrad"])
def test_uncoalesced_and_empty_grads(device: torch.device, step: str) -> None:
    n, d = 12, 5
    values = torch.randn(n, d, device=device)
    state = torch.zeros(n, device=device)
    idx = torch.tensor([[4, 1, 4, 9, 1]])
    vals = torch.randn(5, d)
    raw = torch.sparse_coo_tensor(idx, vals, (n, d), check_invariants=True).to(device)
    assert not raw.is_coalesced()

    def run(v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, fused: bool) -> None:
        if step == "sgd":
            (sparse_sgd_step_ if fused else sparse_sgd_step_ref)(v, g, 0.5)
        else:
            (rowwise_adagrad_step_ if fused else rowwise_adagrad_step_ref)(v, s, g, 0.5)

    a, sa = values.clone(), state.clone()
    b, sb = values.clone(), state.clone()
    run(a, sa, raw, fused=True)
    run(b, sb, raw.coalesce(), fused=False)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert torch.allclose(sa, sb, rtol=1e-6)
    assert not torch.equal(a[4], values[4])

    empty = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, d), (n, d), check_invariants=True
    )
    for fused in (True, False):
        c, sc = values.clone(), state.clone()
        run(c, sc, empty.to(device), fused)
        assert torch.equal(bits(c), bits(values)) and torch.equal(sc, state)


def test_bad_inputs_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    values = torch.randn(6, 4)
    grad = sparse_grad(6, 4, [1, 2], torch.float32, "cpu")
    with pytest.raises(TypeError, match="sparse"):
        sparse_sgd_step_ref(values, grad.to_dense(), 0.1)
    with pytest.raises(ValueError, match="shape"):
        sparse_sgd_step_ref(values[:5], grad, 0.1)
    with pytest.raises(ValueError, match="sparse_dim"):
        sparse_sgd_step_ref(values, grad.to_dense().to_sparse(), 0.1)
    with pytest.raises(ValueError, match="state"):
        rowwise_adagrad_step_ref(values, torch.zeros(6, dtype=torch.float64), grad, 0.1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sparse_sgd_step_(values, grad, 0.1)
    with pytest.raises(ValueError, match="backend"):
        SparseSGD([torch.nn.Parameter(values)], lr=0.1, backend="gpu")
    with pytest.raises(ValueError, match="2-D"):
        RowwiseAdagrad([torch.nn.Parameter(torch.zeros(3))])


class TinyMemory(torch.nn.Module):
    """A product-key-memory-like toy: fixed slots per token, learned weights and values."""

    def __init__(self, n: int, d: int, backend: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.values = torch.nn.Parameter(torch.randn(n, d, generator=gen) * 0.1)
        self.logits = torch.nn.Parameter(torch.zeros(6, 4))
        self.backend = backend

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.logits, dim=-1)
        return lookup(self.values, indices, weights, backend=self.backend)


def train(
    backend: str,
    make_opt: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    steps: int = 6,
) -> tuple[list[float], TinyMemory]:
    model = TinyMemory(30, 7, backend)
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 20, (6, 4), generator=gen)  # rows 20..29 never touched
    target = torch.randn(6, 7, generator=gen)
    table_opt = make_opt(model.values)
    dense_opt = torch.optim.Adam([model.logits], lr=0.05)
    losses = []
    for _ in range(steps):
        table_opt.zero_grad()
        dense_opt.zero_grad()
        loss = (model(indices) - target).square().sum()
        loss.backward()
        assert model.values.grad is not None and model.values.grad.is_sparse
        table_opt.step()
        dense_opt.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_sparse_sgd_optimizer_matches_torch_sgd(backend: str) -> None:
    losses, model = train(backend, lambda p: SparseSGD([p], lr=0.1, backend=backend))
    ref_losses, ref_model = train("torch", lambda p: torch.optim.SGD([p], lr=0.1))
    assert losses[-1] < 0.9 * losses[0]
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5)
    assert torch.allclose(model.values, ref_model.values, rtol=1e-5, atol=1e-6)
    init = TinyMemory(30, 7, backend).values
    assert torch.equal(bits(model.values[20:]), bits(init[20:]))


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_rowwise_adagrad_optimizer_trains(backend: str) -> None:
    losses, model = train(backend, lambda p: RowwiseAdagrad([p], lr=0.05, backend=backend))
    ref_losses, ref_model = train("torch", lambda p: RowwiseAdagrad([p], lr=0.05, backend="torch"))
    assert losses[-1] < 0.9 * losses[0]
    assert torch.allclose(model.values, ref_model.values, rtol=1e-5, atol=1e-6)
    init = TinyMemory(30, 7, backend).values
    assert torch.equal(bits(model.values[20:]), bits(init[20:]))


def test_optimizers_dense_grad_fallback_and_state_dict() -> None:
    p = torch.nn.Parameter(torch.randn(5, 3))
    g = torch.randn(5, 3)
    g[2] = 0.0
    p.grad = g.clone()
    start = p.detach().clone()
    SparseSGD([p], lr=0.1).step()
    assert torch.allclose(p.detach(), start - 0.1 * g)

    q = torch.nn.Parameter(start.clone())
    opt = RowwiseAdagrad([q], lr=0.1, initial_accumulator_value=0.5)
    q.grad = g.clone()
    opt.step()
    expect_v, expect_s = start.clone(), torch.full((5,), 0.5)
    rowwise_adagrad_step_ref(expect_v, expect_s, g.to_sparse(1), 0.1)
    assert torch.allclose(q.detach(), expect_v) and torch.allclose(opt.state[q]["sum"], expect_s)

    clone = torch.nn.Parameter(q.detach().clone())
    opt2 = RowwiseAdagrad([clone], lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved to disk
    q.grad = clone.grad = g.to_sparse(1)
    opt.step()
    opt2.step()
    assert torch.equal(q.detach(), clone.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRET, reason="GPU-sized shapes need compiled kernels (TRITON_INTERPRET=0)")
def test_cuda_auto_backend_fused_steps_bf16() -> None:
    n, d = 1 << 16, 1024
    rows = torch.randperm(n)[:4096].sort().values.tolist()
    values = torch.randn(n, d, device="cuda").bfloat16()
    grad = sparse_grad(n, d, rows, torch.bfloat16, "cuda")
    fused, ref = values.clone(), values.clone()
    sf, sr = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    rowwise_adagrad_step_(fused, sf, grad, 0.01)
    rowwise_adagrad_step_ref(ref, sr, grad, 0.01)
    touched = touched_mask(n, rows).cuda()
    assert torch.equal(bits(fused[~touched]), bits(values[~touched]))
    assert_rows_close(fused[touched], ref[touched], torch.bfloat16)
    assert torch.allclose(sf, sr, rtol=1e-5)
