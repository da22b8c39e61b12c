"""Forward/gradient parity of ``memory_lookup`` (Triton) and ``memory_lookup_ref`` (torch).

Both are compared with a dense fp64 autograd reference computed by plain indexing. All
tests run in debug mode (see ``conftest.py``): every buffer a kernel writes starts as NaN,
so an element a kernel forgot to write fails the comparison.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from knowedit.kernels import lookup, memory_lookup, memory_lookup_ref
from knowedit.kernels._common import load_triton_module
from knowedit.kernels.lookup import memory_lookup_bag

from .conftest import INTERPRET, TRITON_DEVICES

LookupFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN anywhere in ``actual`` gives inf)."""
    if actual.numel() == 0:
        return 0.0
    actual, expected = actual.detach(), expected.detach()
    if torch.isnan(actual).any():
        return float("inf")
    diff = (actual.double() - expected.double()).abs().max()
    return float(diff / expected.double().abs().max().clamp_min(1e-12))


def dense_reference(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 output, dense (N, D) value gradient and weight gradient via plain indexing."""
    v = values.detach().double().requires_grad_()
    w = weights.detach().double().requires_grad_()
    out = (w.unsqueeze(-1) * v[indices]).sum(-2)
    gv, gw = torch.autograd.grad(out, (v, w), grad_out.double())
    return out.detach(), gv, gw


def make_inputs(
    lead: tuple[int, ...],
    k: int,
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    w_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=gen).to(dtype)
    indices = torch.randint(0, n, (*lead, k), generator=gen)
    weights = torch.randn(*lead, k, generator=gen).to(w_dtype)
    return (
        values.to(device).requires_grad_(),
        indices.to(device),
        weights.to(device).requires_grad_(),
    )


def check_parity(
    fn: LookupFn,
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    seed: int = 0,
) -> None:
    """Run ``fn`` forward + backward and compare everything with the dense reference."""
    out = fn(values, indices, weights)
    d = values.shape[1]
    assert out.shape == (*indices.shape[:-1], d)
    assert out.dtype == values.dtype
    assert out.device == values.device
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype).to(out.device)
    gv, gw = torch.autograd.grad(out, (values, weights), grad_out)
    ref_out, ref_gv, ref_gw = dense_reference(
        values.cpu(), indices.cpu(), weights.cpu(), grad_out.cpu()
    )

    tol = TOL[values.dtype]
    assert rel_err(out.cpu(), ref_out) < tol
    assert gw.shape == weights.shape and gw.dtype == weights.dtype
    assert rel_err(gw.cpu(), ref_gw) < max(tol, TOL[weights.dtype])

    # Sparse value gradient: coalesced COO over exactly the distinct touched rows.
    assert gv.is_sparse and gv.is_coalesced()
    assert gv.shape == values.shape and gv.sparse_dim() == 1 and gv.dense_dim() == 1
    assert gv.dtype == values.dtype and gv.device == values.device
    touched = torch.unique(indices.cpu().reshape(-1))
    assert torch.equal(gv.indices().cpu(), touched.unsqueeze(0))
    assert gv.values().shape == (touched.numel(), d)
    assert rel_err(gv.to_dense().cpu(), ref_gv) < tol


IMPLS = [
    pytest.param(memory_lookup_ref, "cpu", id="ref-cpu"),
    *[
        pytest.param(memory_lookup, p.values[0], marks=p.marks, id=f"triton-{p.values[0]}")
        for p in TRITON_DEVICES
    ],
]

SHAPES = [
    # (lead, K, N, D)
    pytest.param((5,), 4, 17, 32, id="pow2"),
    pytest.param((3,), 7, 11, 24, id="K7-D24"),
    pytest.param((2, 3), 5, 9, 40, id="lead2-D40"),
    pytest.param((2, 2, 2), 3, 6, 300, id="lead3-D300-multitile"),
    pytest.param((2,), 37, 50, 5, id="K37-multiblock"),
    pytest.param((4,), 1, 3, 1, id="K1-D1"),
]


@pytest.mark.parametrize(("fn", "device"), IMPLS)
@pytest.mark.parametrize(("lead", "k", "n", "d"), SHAPES)
def test_parity_fp32(
    fn: LookupFn, device: str, lead: tuple[int, ...], k: int, n: int, d: int
) -> None:
    check_parity(fn, *make_inputs(lead, k, n, d, torch.float32, device))


@pytest.mark.parametrize(("fn", "device"), IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", [torch.float32, "same"])
def test_parity_half(fn: LookupFn, device: str, dtype: torch.dtype, w_dtype: object) -> None:
    wd = dtype if w_dtype == "same" else torch.float32
    check_parity(fn, *make_inputs((3, 2), 6, 13, 20, dtype, device, w_dtype=wd))


@pytest.mark.parametrize(("fn", "device"), IMPLS)
def test_duplicates_within_and_across_bags(fn: LookupFn, device: str) -> None:
    values, _, weights = make_inputs((4,), 5, 8, 12, torch.float32, device)
    indices = torch.tensor(
        [[3, 3, 3, 1, 3], [1, 1, 0, 0, 7], [3, 7, 3, 7, 3], [2, 2, 2, 2, 2]], device=device
    )
    check_parity(fn, values, indices, weights)
    out = fn(values, indices, weights)
    expected = weights[3].sum() * values[2]
    assert torch.allclose(out[3], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("fn", "device"), IMPLS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_batch(fn: LookupFn, device: str, lead: tuple[int, ...]) -> None:
    values, indices, weights = make_inputs(lead, 4, 10, 6, torch.bfloat16, device)
    out = fn(values, indices, weights)
    assert out.shape == (*lead, 6) and out.dtype == torch.bfloat16
    gv, gw = torch.autograd.grad(out.float().sum(), (values, weights))
    assert gw.shape == weights.shape
    assert gv.is_sparse and gv.is_coalesced() and gv.shape == (10, 6)
    assert gv._nnz() == 0 and gv.values().shape == (0, 6)


@pytest.mark.parametrize(("fn", "device"), IMPLS)
def test_zero_slots(fn: LookupFn, device: str) -> None:
    values, indices, weights = make_inputs((3,), 0, 10, 6, torch.float32, device)
    out = fn(values, indices, weights)
    assert torch.equal(out, torch.zeros(3, 6, device=device))
    gv, gw = torch.autograd.grad(out.sum(), (values, weights))
    assert gv._nnz() == 0 and gw.shape == (3, 0)


@pytest.mark.parametrize(("fn", "device"), IMPLS)
def test_only_values_or_only_weights_need_grad(fn: LookupFn, device: str) -> None:
    values, indices, weights = make_inputs((3,), 4, 10, 6, torch.float32, device)
    (gv,) = torch.autograd.grad(fn(values, indices, weights.detach()).sum(), (values,))
    assert gv.is_sparse
    (gw,) = torch.autograd.grad(fn(values.detach(), indices, weights).sum(), (weights,))
    assert gw.shape == weights.shape
    assert not fn(values.detach(), indices, weights.detach()).requires_grad


@pytest.mark.parametrize(("fn", "device"), IMPLS)
def test_never_allocates_full_table(fn: LookupFn, device: str) -> None:
    """A 2^40-row table (a stride-0 view; 64 TiB if materialised) works end to end."""
    n, d = 1 << 40, 8
    base = torch.randn(1, d, device=device)
    values = base.expand(n, d).detach().requires_grad_()
    indices = torch.tensor([[5, n - 1, 5], [123456789, 0, 5]], device=device)
    weights = torch.rand(2, 3, device=device)
    out = fn(values, indices, weights)
    assert torch.allclose(out, weights.sum(-1, keepdim=True) * base, rtol=1e-5)
    (gv,) = torch.autograd.grad(out.sum(), (values,))
    assert gv.shape == (n, d)
    assert gv.indices().tolist() == [[0, 5, 123456789, n - 1]]
    row5 = weights[0, 0] + weights[0, 2] + weights[1, 2]
    assert torch.allclose(gv.values()[1], row5.expand(d))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(0, 3), min_size=1, max_size=3).map(tuple),
    k=st.integers(1, 9),
    n=st.integers(1, 12),
    d=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
def test_parity_random_shapes(
    lead: tuple[int, ...], k: int, n: int, d: int, dtype: torch.dtype, seed: int
) -> None:
    for fn in (memory_lookup, memory_lookup_ref):
        check_parity(fn, *make_inputs(lead, k, n, d, dtype, seed=seed), seed=seed)


def test_kernel_matches_ref_bitwise_fp32_forward() -> None:
    """Both fp32 paths sum the same K products in fp32; they agree to rounding."""
    values, indices, weights = make_inputs((6,), 9, 20, 33, torch.float32)
    if INTERPRET:
        a = memory_lookup(values, indices, weights)
        b = memory_lookup_ref(values, indices, weights)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    c = F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")
    assert torch.allclose(memory_lookup_ref(values, indices, weights), c, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
def test_poisoning_exposes_unwritten_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves the debug-mode poisoning is live: a kernel that writes nothing gives NaN."""
    kern = load_triton_module("_lookup_triton")

    class _NoOpLaunch:
        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kern, "lookup_fwd_kernel", _NoOpLaunch())
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32)
    assert torch.isnan(memory_lookup(values, indices, weights)).all()


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
def test_gradient_accumulates_into_parameter_and_sparse_adam_steps() -> None:
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(30, 8))
    before = table.detach().clone()
    indices = torch.randint(0, 10, (4, 3))
    weights = torch.rand(4, 3)
    memory_lookup(table, indices, weights).sum().backward()
    memory_lookup(table, indices + 10, weights).sum().backward()
    grad = table.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    touched = torch.cat([indices, indices + 10]).unique()
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(dense[untouched], torch.zeros_like(dense[untouched]))
    assert torch.allclose(dense[indices[0, 0]], dense[indices[0, 0] + 10])

    opt = torch.optim.SparseAdam([table], lr=0.1)
    opt.step()
    assert torch.equal(table.detach()[untouched], before[untouched])
    assert not torch.equal(table.detach()[touched], before[touched])


def test_lookup_dispatch_cpu() -> None:
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32)
    expected = memory_lookup_ref(values, indices, weights)
    assert torch.equal(lookup(values, indices, weights), expected)
    assert torch.equal(lookup(values, indices, weights, backend="torch"), expected)
    if INTERPRET:
        got = lookup(values, indices, weights, backend="triton")
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("fn", "device"), IMPLS)
def test_out_of_range_ids_raise_in_debug_mode(fn: LookupFn, device: str) -> None:
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32, device)
    with pytest.raises(IndexError):
        fn(values, indices + 5, weights)
    with pytest.raises(IndexError):
        fn(values, indices - 6, weights)


def test_bad_inputs_raise() -> None:
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        memory_lookup_ref(values, indices, weights[:, :2])
    with pytest.raises(ValueError, match="2-D"):
        memory_lookup_ref(values[0], indices, weights)
    with pytest.raises(TypeError, match="integer"):
        memory_lookup_ref(values, indices.float(), weights)
    with pytest.raises(ValueError, match="backend"):
        lookup(values, indices, weights, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRET, reason="GPU-sized shapes need compiled kernels (TRITON_INTERPRET=0)")
def test_cuda_auto_uses_triton_and_matches_ref_at_scale() -> None:
    values, indices, weights = make_inputs((64, 16), 32, 4096, 1000, torch.bfloat16, "cuda")
    out = lookup(values, indices, weights)  # auto -> triton on CUDA
    ref = memory_lookup_ref(values, indices, weights)
    assert rel_err(out.float(), ref.float()) < 1e-2
    g = torch.randn_like(out)
    gv, gw = torch.autograd.grad(out, (values, weights), g)
    rv, rw = torch.autograd.grad(ref, (values, weights), g)
    assert torch.equal(gv.indices(), rv.indices())
    assert rel_err(gv.values().float(), rv.values().float()) < 1e-2
    assert rel_err(gw, rw) < 1e-2


# --------------------------------------------------------------------------- embedding-bag path
# ``memory_lookup_bag`` is the torch backend's fast path (fp32/fp64); every test compares it
# with the dense fp64 reference and with ``memory_lookup_ref``.

lookup_mod = importlib.import_module("knowedit.kernels.lookup")


def check_bag_matches_ref(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> None:
    """Bag and reference agree on the output and both gradients (same sparse layout)."""
    g = torch.randn(*indices.shape[:-1], values.shape[1], dtype=values.dtype)
    out = memory_lookup_bag(values, indices, weights)
    ref = memory_lookup_ref(values, indices, weights)
    tol = TOL[values.dtype]
    assert rel_err(out, ref) < tol
    gv, gw = torch.autograd.grad(out, (values, weights), g)
    rv, rw = torch.autograd.grad(ref, (values, weights), g)
    assert torch.equal(gv.indices(), rv.indices())
    assert rel_err(gv.values(), rv.values()) < tol
    assert rel_err(gw, rw) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("lead", "k", "n", "d"), SHAPES)
def test_bag_parity(dtype: torch.dtype, lead: tuple[int, ...], k: int, n: int, d: int) -> None:
    inputs = make_inputs(lead, k, n, d, dtype, w_dtype=dtype)
    check_parity(memory_lookup_bag, *inputs)
    check_bag_matches_ref(*inputs)


@pytest.mark.parametrize(
    ("lead", "k", "n", "d"),
    [((4, 256), 128, 4096, 512), ((64,), 128, 1 << 16, 64), ((33,), 32, 100, 7)],
    ids=["pkm-4K", "pkm-64K", "odd"],
)
def test_bag_matches_ref_at_layer_shapes(lead: tuple[int, ...], k: int, n: int, d: int) -> None:
    check_bag_matches_ref(*make_inputs(lead, k, n, d, torch.float32))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    lead=st.lists(st.integers(0, 3), min_size=1, max_size=3).map(tuple),
    k=st.integers(0, 9),
    n=st.integers(1, 12),
    d=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_bag_parity_random_shapes(
    lead: tuple[int, ...], k: int, n: int, d: int, dtype: torch.dtype, seed: int
) -> None:
    inputs = make_inputs(lead, k, n, d, dtype, w_dtype=dtype, seed=seed)
    check_parity(memory_lookup_bag, *inputs, seed=seed)


def test_bag_duplicates_within_and_across_bags() -> None:
    values, _, weights = make_inputs((4,), 5, 8, 12, torch.float32)
    indices = torch.tensor([[3, 3, 3, 1, 3], [1, 1, 0, 0, 7], [3, 7, 3, 7, 3], [2, 2, 2, 2, 2]])
    check_parity(memory_lookup_bag, values, indices, weights)
    check_bag_matches_ref(values, indices, weights)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_bag_empty_batch_and_zero_slots(lead: tuple[int, ...]) -> None:
    values, indices, weights = make_inputs(lead, 4, 10, 6, torch.float32)
    out = memory_lookup_bag(values, indices, weights)
    gv, gw = torch.autograd.grad(out.sum(), (values, weights))
    assert out.shape == (*lead, 6) and gw.shape == weights.shape
    assert gv.is_sparse and gv.is_coalesced() and gv._nnz() == 0
    values, indices, weights = make_inputs((3,), 0, 10, 6, torch.float32)
    out = memory_lookup_bag(values, indices, weights)
    assert torch.equal(out, torch.zeros(3, 6))
    gv, gw = torch.autograd.grad(out.sum(), (values, weights))
    assert gv._nnz() == 0 and gw.shape == (3, 0)


def test_bag_only_values_or_only_weights_need_grad() -> None:
    values, indices, weights = make_inputs((3,), 4, 10, 6, torch.float32)
    (gv,) = torch.autograd.grad(memory_lookup_bag(values, indices, weights).sum(), (values,))
    assert gv.is_sparse
    (gw,) = torch.autograd.grad(
        memory_lookup_bag(values.detach(), indices, weights).sum(), (weights,)
    )
    assert gw.shape == weights.shape


def test_bag_rejects_what_it_does_not_handle() -> None:
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.bfloat16)
    with pytest.raises(ValueError, match="memory_lookup_ref"):
        memory_lookup_bag(values, indices, weights)
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32, w_dtype=torch.float64)
    with pytest.raises(ValueError, match="memory_lookup_ref"):
        memory_lookup_bag(values, indices, weights)
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32)
    with pytest.raises(IndexError):
        memory_lookup_bag(values, indices + 5, weights)


def test_torch_backend_uses_bag_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = lookup_mod._MemoryLookupBag.apply
    monkeypatch.setattr(
        lookup_mod._MemoryLookupBag, "apply", lambda *a: calls.append("bag") or real(*a)
    )
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.float32)
    lookup(values, indices, weights, backend="torch")
    assert calls == ["bag"]
    values, indices, weights = make_inputs((2,), 3, 5, 4, torch.bfloat16)
    lookup(values, indices, weights, backend="torch")  # bf16: the reference
    assert calls == ["bag"]


def test_gather_dot_and_scatter_rows_match_plain_indexing() -> None:
    gen = torch.Generator().manual_seed(3)
    rows, table = torch.randn(6, 5, generator=gen), torch.randn(9, 5, generator=gen)
    idx = torch.randint(0, 9, (6, 4), generator=gen)
    w = torch.randn(6, 4, generator=gen)
    expected = (table[idx] * rows[:, None, :]).sum(-1)
    assert torch.allclose(lookup_mod.gather_dot(rows, table, idx), expected, atol=1e-6)
    uniq, out = lookup_mod.scatter_rows(idx, w, rows)
    dense = torch.zeros(9, 5).index_add_(
        0, idx.reshape(-1), (w[..., None] * rows[:, None]).reshape(-1, 5)
    )
    assert torch.equal(uniq, idx.unique())
    assert torch.allclose(out, dense[uniq], atol=1e-6)


def test_bag_reused_gradient_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large value gradients go into a reused buffer: same results, chunked writes, and a
    gradient that is still alive (accumulation) is never overwritten."""
    monkeypatch.setattr(lookup_mod, "_REUSE_MIN_BYTES", 0)
    monkeypatch.setattr(lookup_mod, "_ROW_CHUNK_ELEMS", 3 * 8)  # 3 rows per chunk
    monkeypatch.setattr(lookup_mod, "_row_buffers", lookup_mod._RowBuffers())
    table = torch.nn.Parameter(torch.randn(40, 8))
    opt = torch.optim.SGD([table], lr=0.1)
    ptrs = []
    _, indices, _ = make_inputs((5,), 6, 40, 8, torch.float32)
    for seed in range(3):  # same ids (so the same number of distinct rows), new weights
        weights = make_inputs((5,), 6, 40, 8, torch.float32, seed=seed)[2]
        opt.zero_grad(set_to_none=True)
        check_bag_matches_ref(table, indices, weights.detach().requires_grad_())
        memory_lookup_bag(table, indices, weights.detach()).pow(2).sum().backward()
        ptrs.append(table.grad._values().data_ptr())
        opt.step()
    assert ptrs[1] == ptrs[2]  # the freed gradient's buffer was reused

    opt.zero_grad(set_to_none=True)
    _, indices, weights = make_inputs((5,), 6, 40, 8, torch.float32, seed=9)
    memory_lookup_bag(table, indices, weights.detach()).sum().backward()
    once = table.grad.to_dense().clone()
    memory_lookup_bag(table, indices, weights.detach()).sum().backward()
    assert torch.allclose(table.grad.to_dense(), 2 * once)
