"""The product-key memory layer: exact top-k, sparse value gradients, shared
pools, access traces, usage metrics and row patches."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import knowedit.memory as memory_mod
from knowedit.config import MemoryConfig, ModelConfig, model_preset
from knowedit.memory import (
    MemoryTrace,
    ProductKeyMemory,
    RowPatch,
    ValuePool,
    product_topk,
    product_topk_ref,
    usage_metrics,
)
from knowedit.model import MemoryLM, build_model

FAST = settings(max_examples=20, deadline=None, database=None)


def brute_force_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scores of all N = n^2 full keys; full key of slot i*n+j = concat(K1[i], K2[j]).

    Args:
        q: (..., H, Dk) queries.
        keys: (H, 2, n, Dk // 2) half-key tables.

    Returns:
        (..., H, n * n) scores ``q . full_key``.
    """
    H, _, n, half = keys.shape
    k1 = keys[:, 0, :, None, :].expand(H, n, n, half)  # (H, n, n, half): K1[i]
    k2 = keys[:, 1, None, :, :].expand(H, n, n, half)  # (H, n, n, half): K2[j]
    full = torch.cat([k1, k2], dim=-1).reshape(H, n * n, 2 * half)  # (H, N, Dk)
    return torch.einsum("...hd,hnd->...hn", q, full)


def assert_same_topk(
    scores: torch.Tensor, ids: torch.Tensor, all_scores: torch.Tensor, k: int
) -> None:
    """Product-key (scores, ids) equal the brute-force top-k as sets, best first."""
    ref_scores, ref_ids = all_scores.topk(k, dim=-1)
    assert ids.shape == ref_ids.shape == scores.shape
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-10, atol=1e-10)
    # Each returned score is the score of the returned slot, best first.
    torch.testing.assert_close(scores, all_scores.gather(-1, ids), rtol=1e-10, atol=1e-10)
    assert bool((scores[..., :-1] >= scores[..., 1:]).all())


@FAST
@given(
    heads=st.integers(1, 3),
    n_keys=st.integers(1, 9),
    half=st.integers(1, 5),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_product_topk_equals_brute_force(
    heads: int, n_keys: int, half: int, lead: tuple[int, ...], k_frac: float, seed: int
) -> None:
    k = 1 + int(k_frac * (n_keys**2 - 1))  # 1 .. N, including k > n_keys
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, heads, 2 * half, generator=gen, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, half, generator=gen, dtype=torch.float64)
    scores, ids = product_topk(q, keys, k, n_keys)
    assert ids.dtype == torch.int64
    assert_same_topk(scores, ids, brute_force_scores(q, keys), k)


@FAST
@given(
    heads=st.integers(1, 3),
    n_keys=st.integers(2, 8),
    half=st.integers(1, 4),
    k_frac=st.floats(0.0, 1.0),
    qk_norm=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_select_equals_brute_force(
    heads: int, n_keys: int, half: int, k_frac: float, qk_norm: bool, seed: int
) -> None:
    k = 1 + int(k_frac * (n_keys**2 - 1))
    cfg = MemoryConfig(n_keys=n_keys, heads=heads, topk=k, key_dim=2 * half, qk_norm=qk_norm)
    torch.manual_seed(seed)
    d_model = 6
    mem = ProductKeyMemory(d_model, cfg, ValuePool(n_keys**2, d_model), layer=0).double()
    x = torch.randn(2, 3, d_model, dtype=torch.float64)
    with torch.no_grad():
        q, ids, w = mem.select(x)
        all_scores = brute_force_scores(mem.queries(x), mem.half_keys())
    assert q.shape == (2, 3, heads, 2 * half)
    assert ids.shape == w.shape == (2, 3, heads, k)
    ref_scores, _ = all_scores.topk(k, dim=-1)
    assert_same_topk(all_scores.gather(-1, ids), ids, all_scores, k)
    torch.testing.assert_close(w, ref_scores.softmax(-1), rtol=1e-10, atol=1e-10)


def test_select_rejects_bad_config() -> None:
    pool = ValuePool(16, 4)
    with pytest.raises(ValueError, match="key_dim"):
        ProductKeyMemory(4, MemoryConfig(n_keys=4, heads=1, topk=2, key_dim=3), pool, 0)
    with pytest.raises(ValueError, match="topk"):
        ProductKeyMemory(4, MemoryConfig(n_keys=4, heads=1, topk=17, key_dim=4), pool, 0)


# --- fast path against the reference ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backward", ["dense", "sparse"])
@pytest.mark.parametrize(
    ("lead", "heads", "n_keys", "half", "k"),
    [((2, 3), 2, 5, 3, 7), ((37,), 4, 64, 16, 32), ((5,), 1, 3, 2, 9), ((4, 4), 3, 9, 4, 1)],
)
def test_product_topk_matches_reference(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    backward: str,
    lead: tuple[int, ...],
    heads: int,
    n_keys: int,
    half: int,
    k: int,
) -> None:
    """Chunked scoring, the candidate-pair pruning and both sub-key backwards (dense
    scatter + bmm, sparse embedding-bag) give the reference's scores, ids and gradients."""
    monkeypatch.setattr(memory_mod, "_SCORE_CHUNK_ELEMS", 2 * heads * n_keys)  # 1-row chunks
    if backward == "sparse":
        monkeypatch.setattr(memory_mod, "_DENSE_SCORE_GRAD_MAX_KEYS", 0)
    gen = torch.Generator().manual_seed(n_keys + k)
    q = torch.randn(*lead, heads, 2 * half, generator=gen, dtype=dtype, requires_grad=True)
    keys = torch.randn(heads, 2, n_keys, half, generator=gen, dtype=dtype, requires_grad=True)
    scores, ids = product_topk(q, keys, k, n_keys)
    ref_scores, ref_ids = product_topk_ref(q, keys, k, n_keys)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores)
    g = torch.randn(scores.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad(scores, (q, keys), g)
    want = torch.autograd.grad(ref_scores, (q, keys), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("k", [1, 2, 7, 32, 64])
@pytest.mark.parametrize("kk", [1, 3, 8, 32])
def test_pair_ranks_hold_every_possible_top_k_pair(kk: int, k: int) -> None:
    """Every pair that can be among the top k of a sorted-sum grid is a candidate."""
    if kk * kk < k:
        return
    a, b = memory_mod._pair_ranks(kk, k, "cpu")
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    assert len(pairs) >= k
    assert pairs == {(i, j) for i in range(kk) for j in range(kk) if (i + 1) * (j + 1) <= k}


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "memory+"])
@pytest.mark.parametrize("n_keys", [8, 300])
def test_layer_matches_reference_paths(
    monkeypatch: pytest.MonkeyPatch, plus: bool, n_keys: int
) -> None:
    """The whole layer (fast lookup and top-k) against the reference paths: output and the
    gradient of every parameter, the value gradient sparse over the same rows."""
    from knowedit.kernels import memory_lookup_ref

    cfg = MemoryConfig(n_keys=n_keys, heads=2, topk=8, key_dim=16, swilu=plus, qk_norm=plus)
    torch.manual_seed(0)
    mem = ProductKeyMemory(12, cfg, ValuePool(n_keys**2, 12), layer=0)
    x = torch.randn(3, 5, 12)
    out = mem(x)
    got = torch.autograd.grad(out.square().sum(), list(mem.parameters()))
    monkeypatch.setattr(memory_mod, "product_topk", product_topk_ref)
    monkeypatch.setattr(memory_mod, "lookup", lambda v, i, w, backend: memory_lookup_ref(v, i, w))
    ref = mem(x)
    want = torch.autograd.grad(ref.square().sum(), list(mem.parameters()))
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want, strict=True):
        if a.is_sparse:
            a, b = a.coalesce(), b.coalesce()
            assert torch.equal(a.indices(), b.indices())
            a, b = a.values(), b.values()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- query batch norm ------------------------------------------------------------------


def _bn_memory() -> ProductKeyMemory:
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, key_dim=16, query_bn=True)
    torch.manual_seed(0)
    return ProductKeyMemory(12, cfg, ValuePool(64, 12), layer=0)


def _bn_buffers(mem: ProductKeyMemory) -> dict[str, torch.Tensor]:
    assert mem.query_bn is not None
    return {n: b.clone() for n, b in mem.query_bn.named_buffers()}


def test_query_bn_trains_with_the_query_projection_and_only_then() -> None:
    """Batch statistics, and updates of the running ones, only while the query
    projection trains; frozen (value-only learning) or without gradients the layer
    reads its running statistics and changes no buffer."""
    mem = _bn_memory().train()
    x = torch.randn(3, 5, 12) * 4 + 2
    before = _bn_buffers(mem)
    mem(x).sum().backward()
    after = _bn_buffers(mem)
    assert int(after["num_batches_tracked"]) == 1
    assert not torch.equal(after["running_mean"], before["running_mean"])
    assert mem.query_bn.weight.grad is not None  # type: ignore[union-attr]
    # Frozen query projection, still in train mode: the running statistics, unchanged.
    mem.query.weight.requires_grad_(False)
    frozen = mem(x)
    frozen.sum().backward()
    assert all(torch.equal(b, after[n]) for n, b in _bn_buffers(mem).items())
    with torch.no_grad():
        evald = mem.eval()(x)
    torch.testing.assert_close(frozen.detach(), evald)
    # Trainable but under no_grad (scoring during training): no update either.
    mem.query.weight.requires_grad_(True)
    mem.train()
    with torch.no_grad():
        mem(x)
    assert all(torch.equal(b, after[n]) for n, b in _bn_buffers(mem).items())
    # The normalisation changes what the queries select (else the option would do nothing).
    plain = ProductKeyMemory(12, MemoryConfig(n_keys=8, heads=2, topk=4, key_dim=16), mem.pool, layer=0)
    plain.load_state_dict({k: v for k, v in mem.state_dict().items() if not k.startswith("query_bn.")}, strict=False)
    with torch.no_grad():
        assert not torch.equal(plain.eval().select(x)[1], mem.eval().select(x)[1])


# --- sparse value gradients ------------------------------------------------------------


def _memory(
    n_keys: int, d: int = 8, heads: int = 2, topk: int = 3, pool: ValuePool | None = None
) -> ProductKeyMemory:
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=n_keys, heads=heads, topk=topk, key_dim=8, backend="torch")
    return ProductKeyMemory(d, cfg, pool or ValuePool(n_keys**2, d), layer=0)


def test_value_gradient_is_sparse_and_never_materialised() -> None:
    """A 2^40-row value table (a stride-0 view: 32 TiB if materialised) trains end to end."""
    d, n = 8, 1 << 40
    pool = ValuePool(1, d)
    pool.values = nn.Parameter(torch.randn(1, d).expand(n, d))
    mem = _memory(n_keys=1 << 20, d=d, heads=1, topk=3, pool=pool)
    x = torch.randn(2, 3, d)
    trace: list[MemoryTrace] = []
    mem(x, trace=trace).square().sum().backward()
    grad = mem.pool.values.grad
    assert grad.layout == torch.sparse_coo
    assert grad.shape == (n, d)
    grad = grad.coalesce()
    assert grad.indices().tolist() == [trace[0].slots.unique().tolist()]
    assert grad.values().shape == (trace[0].slots.unique().numel(), d)


def test_only_selected_rows_get_gradient_and_change() -> None:
    mem = _memory(n_keys=16)
    x = torch.randn(2, 5, 8)
    trace: list[MemoryTrace] = []
    mem(x, trace=trace).square().sum().backward()
    grad = mem.pool.values.grad
    assert grad.layout == torch.sparse_coo
    selected = trace[0].slots.unique()
    assert 0 < selected.numel() < mem.pool.n_slots  # the test needs untouched rows
    dense = grad.to_dense()
    touched = dense.ne(0).any(-1).nonzero().flatten()
    assert touched.tolist() == selected.tolist()

    before = mem.pool.values.detach().clone()
    torch.optim.SparseAdam([mem.pool.values], lr=1e-2).step()
    after = mem.pool.values.detach()
    changed = after.ne(before).any(-1).nonzero().flatten()
    assert changed.tolist() == selected.tolist()
    untouched = torch.ones(mem.pool.n_slots, dtype=torch.bool)
    untouched[selected] = False
    assert torch.equal(after[untouched], before[untouched])  # bit-identical


def test_training_step_changes_only_read_rows_of_shared_pool() -> None:
    """The recipe's step (AdamW + SparseAdam) on a model touches only the rows it read."""
    cfg = model_preset("tiny")
    cfg.vocab_size = 40
    cfg.memory.shared_values = True
    model = build_model(cfg, seed=0)
    (pool,) = model.value_parameters()
    idx = torch.randint(0, 40, (2, 6))
    trace: list[MemoryTrace] = []
    logits = model(idx, trace=trace)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    dense = torch.optim.AdamW(model.other_parameters(), lr=1e-3)
    sparse = torch.optim.SparseAdam(model.value_parameters(), lr=1e-3)
    loss.backward()
    assert pool.grad.layout == torch.sparse_coo
    read = torch.cat([t.slots.flatten() for t in trace]).unique()
    assert read.numel() < pool.shape[0]
    before = pool.detach().clone()
    dense.step()
    sparse.step()
    changed = pool.detach().ne(before).any(-1).nonzero().flatten()
    assert changed.tolist() == read.tolist()


# --- shared pools and parameter groups ------------------------------------------------------


def _tiny(shared: bool, layers: list[int]) -> MemoryLM:
    cfg = model_preset("tiny")
    cfg.vocab_size = 30
    cfg.n_layers = 3
    cfg.memory_layers = layers
    cfg.memory.shared_values = shared
    return build_model(cfg, seed=0)


@pytest.mark.parametrize("layers", [[0, 1], [0, 1, 2]])
def test_shared_pool_is_one_tensor(layers: list[int]) -> None:
    model = _tiny(True, layers)
    mems = model.memory_layers()
    assert [m.layer for m in mems] == layers
    first = mems[0].pool.values
    for m in mems:
        assert m.pool.values is first
        assert m.pool.values.data_ptr() == first.data_ptr()
    assert len(model.value_parameters()) == 1
    assert model.value_parameters()[0] is first
    # state_dict aliases, not copies
    ptrs = {t.data_ptr() for k, t in model.state_dict().items() if k.endswith("pool.values")}
    assert ptrs == {first.data_ptr()}


@pytest.mark.parametrize("layers", [[0, 1], [0, 1, 2]])
def test_unshared_pools_one_per_layer(layers: list[int]) -> None:
    model = _tiny(False, layers)
    vals = model.value_parameters()
    assert len(vals) == len(layers)
    assert len({v.data_ptr() for v in vals}) == len(layers)
    assert [m.pool.values for m in model.memory_layers()] == vals
    assert len({m.pool.name for m in model.memory_layers()}) == len(layers)


@pytest.mark.parametrize(("shared", "layers"), [(True, [0, 2]), (False, [0, 1, 2]), (True, [])])
def test_value_and_other_parameters_partition(shared: bool, layers: list[int]) -> None:
    model = _tiny(shared, layers)
    vals = {id(p) for p in model.value_parameters()}
    others = [id(p) for p in model.other_parameters()]
    everything = [id(p) for p in model.parameters()]
    assert len(set(others)) == len(others)
    assert vals.isdisjoint(others)
    assert vals | set(others) == set(everything)
    assert len(vals) + len(others) == len(everything)


# --- traces and usage ------------------------------------------------------------------------


def test_trace_per_memory_layer() -> None:
    cfg = ModelConfig(
        vocab_size=30,
        d_model=16,
        n_layers=3,
        n_heads=2,
        max_seq_len=12,
        memory_layers=[0, 2],
        memory=MemoryConfig(n_keys=5, heads=3, topk=4, key_dim=6, shared_values=True),
    )
    model = build_model(cfg, seed=0)
    B, T = 2, 7
    trace: list[MemoryTrace] = []
    model(torch.randint(0, 30, (B, T)), trace=trace)
    assert [t.layer for t in trace] == [0, 2]
    for t in trace:
        assert t.pool == "pool"
        assert t.query.shape == (B, T, 3, 6)
        assert t.slots.shape == t.weights.shape == (B, T, 3, 4)
        assert t.slots.dtype == torch.int64
        assert int(t.slots.min()) >= 0 and int(t.slots.max()) < 25
        assert bool((t.weights >= 0).all())
        torch.testing.assert_close(t.weights.sum(-1), torch.ones(B, T, 3))
        assert bool((t.slots.sort(-1).values.diff(dim=-1) > 0).all())  # distinct per head
    assert not any(t.query.requires_grad or t.weights.requires_grad for t in trace)


def test_no_trace_by_default() -> None:
    model = _tiny(True, [0, 1])
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 30)


@pytest.mark.parametrize("n", [1, 7, 256])
def test_usage_metrics_uniform(n: int) -> None:
    m = usage_metrics(torch.full((n,), 3.0))
    assert m["used_fraction"] == 1.0
    assert abs(m["kl_uniform"]) < 1e-12
    assert m["top1pct_share"] == pytest.approx(max(1, n // 100) / n)


@pytest.mark.parametrize("n", [2, 7, 256])
def test_usage_metrics_one_hot(n: int) -> None:
    counts = torch.zeros(n)
    counts[n // 2] = 5
    m = usage_metrics(counts)
    assert m["used_fraction"] == pytest.approx(1 / n)
    assert m["kl_uniform"] == pytest.approx(math.log(n))
    assert m["top1pct_share"] == pytest.approx(1.0)


def test_usage_metrics_empty() -> None:
    assert usage_metrics(torch.zeros(4)) == {"used_fraction": 0.0, "kl_uniform": 0.0, "top1pct_share": 0.0}


# --- row patches -----------------------------------------------------------------------------


def _patch_setup() -> tuple[ProductKeyMemory, torch.Tensor, torch.Tensor]:
    """A float64 memory, an input and the ids it reads (B, T, H, k)."""
    torch.manual_seed(3)
    cfg = MemoryConfig(n_keys=4, heads=2, topk=2, key_dim=4)
    mem = ProductKeyMemory(6, cfg, ValuePool(16, 6), layer=0).double()
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        _, ids, _ = mem.select(x)
    return mem, x, ids


def _partly_read_slots(ids: torch.Tensor) -> torch.Tensor:
    """Two slots that some tokens read and others do not."""
    reads = torch.stack([(ids == s).any(-1).any(-1) for s in range(16)])  # (N, B, T)
    frac = reads.flatten(1).double().mean(1)
    slots = ((frac > 0) & (frac < 0.5)).nonzero().flatten()[:2]
    assert slots.numel() == 2
    return slots.sort().values


def test_patch_with_stored_rows_is_identity() -> None:
    mem, x, ids = _patch_setup()
    slots = ids.flatten().unique()[:5]
    patch = RowPatch(slots, mem.pool.values.detach()[slots].clone())
    with torch.no_grad():
        assert torch.equal(mem(x, patch=patch), mem(x))


def test_patch_changes_only_tokens_that_read_its_slots() -> None:
    mem, x, ids = _patch_setup()
    slots = _partly_read_slots(ids)
    patch = RowPatch(slots, mem.pool.values.detach()[slots] + 1.0)
    with torch.no_grad():
        base, patched = mem(x), mem(x, patch=patch)
    reads = torch.isin(ids, slots).flatten(-2).any(-1)  # (B, T)
    assert 0 < int(reads.sum()) < reads.numel()
    assert torch.equal(patched[~reads], base[~reads])  # bit-identical elsewhere
    assert bool((patched[reads] - base[reads]).abs().amax(-1).gt(1e-6).all())


def test_patch_equals_writing_the_rows() -> None:
    """Reading through a patch gives what storing the rows in the pool would give."""
    mem, x, ids = _patch_setup()
    slots = _partly_read_slots(ids)
    rows = mem.pool.values.detach()[slots] + torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        patched = mem(x, patch=RowPatch(slots, rows))
        mem.pool.values[slots] = rows
        written = mem(x)
    torch.testing.assert_close(patched, written, rtol=1e-12, atol=1e-12)


def test_patch_gradient_reaches_rows_only() -> None:
    mem, x, ids = _patch_setup()
    slots = _partly_read_slots(ids)
    rows = mem.pool.values.detach()[slots].clone().requires_grad_()
    for p in mem.parameters():
        p.requires_grad_(False)
    mem(x, patch=RowPatch(slots, rows)).square().sum().backward()
    assert rows.grad is not None and bool(rows.grad.ne(0).any(-1).all())
    assert all(p.grad is None for p in mem.parameters())


def test_model_patch_is_causal() -> None:
    """In the model, a patch changes no logits before the first position that reads it."""
    cfg = model_preset("tiny")
    cfg.vocab_size = 30
    cfg.memory.n_keys = 4
    cfg.memory.topk = 2
    cfg.memory.shared_values = True
    model = build_model(cfg, seed=1).double()
    idx = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    trace: list[MemoryTrace] = []
    with torch.no_grad():
        base = model(idx, trace=trace)
        read_at = torch.stack([t.slots for t in trace])  # (L, B, T, H, k)
        slot = int(read_at[:, :, -1].flatten()[0])  # read by the last token at least
        rows = model.pools["pool"].values[[slot]] + 1.0
        patched = model(idx, patches={"pool": RowPatch(torch.tensor([slot]), rows)})
    reads = (read_at == slot).flatten(-2).any(-1).any(0)  # (B, T)
    for b in range(2):
        first = int(reads[b].nonzero()[0]) if bool(reads[b].any()) else 10
        assert torch.equal(patched[b, :first], base[b, :first])
        if first < 10:
            assert not torch.allclose(patched[b, first], base[b, first])
