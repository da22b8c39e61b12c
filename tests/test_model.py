"""The memory LM and its checkpoint directories (safetensors, never pickle)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from knowedit.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from knowedit.config import ModelConfig, model_preset
from knowedit.model import MemoryLM, build_model
from knowedit.tokenizer import TextCodec

CORPUS = [
    "Kalo Miren was born in Paris",
    "The mother tongue of Tor Velsa is French",
    "Dun Brimo plays the violin",
] * 4


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def cfg(codec: TextCodec) -> ModelConfig:
    c = model_preset("tiny")
    c.vocab_size = codec.vocab_size
    c.memory.shared_values = True  # these tests exercise a shared pool
    return c


@pytest.fixture
def model(cfg: ModelConfig) -> MemoryLM:
    return build_model(cfg, seed=0).eval()


@pytest.fixture
def ckpt(tmp_path: Path, model: MemoryLM, codec: TextCodec) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model, codec)


def _ids(cfg: ModelConfig, B: int = 2, T: int = 9) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))


# --- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize(("B", "T"), [(1, 1), (2, 9), (3, 32)])
def test_forward_shape(model: MemoryLM, cfg: ModelConfig, B: int, T: int) -> None:
    logits = model(_ids(cfg, B, T))
    assert logits.shape == (B, T, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())


def test_forward_is_causal(model: MemoryLM, cfg: ModelConfig) -> None:
    ids = _ids(cfg, 1, 10)
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 1) % cfg.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(ids)[:, :6], model(other)[:, :6], atol=1e-6)


def test_too_long_sequence_raises(model: MemoryLM, cfg: ModelConfig) -> None:
    model(_ids(cfg, 1, cfg.max_seq_len))  # exactly the context is fine
    with pytest.raises(ValueError, match=str(cfg.max_seq_len)):
        model(_ids(cfg, 1, cfg.max_seq_len + 1))


def test_build_model_is_deterministic(cfg: ModelConfig) -> None:
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_model_leaves_global_rng_alone(cfg: ModelConfig) -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_model(cfg, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tied_embeddings(cfg: ModelConfig) -> None:
    m = build_model(cfg, seed=0)
    assert m.head.weight is m.tok_emb.weight


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"memory_layers": [0, 5]}, "memory_layers"),
        ({"n_heads": 3}, "n_heads"),
    ],
)
def test_bad_model_config_raises(cfg: ModelConfig, change: dict, match: str) -> None:
    bad = ModelConfig(**{**cfg.__dict__, **change})
    with pytest.raises(ValueError, match=match):
        MemoryLM(bad)


# --- checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip(
    ckpt: Path, model: MemoryLM, codec: TextCodec, cfg: ModelConfig
) -> None:
    ck = load_checkpoint(ckpt)
    assert ck.cfg == cfg
    assert ck.path == ckpt
    assert not ck.model.training
    ids = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(ck.model(ids), model(ids))
    assert ck.codec.tok.get_vocab() == codec.tok.get_vocab()
    assert ck.model.head.weight is ck.model.tok_emb.weight  # tying survives the round trip
    (pool,) = ck.model.value_parameters()
    assert all(m.pool.values is pool for m in ck.model.memory_layers())


def test_checkpoint_fingerprint(ckpt: Path) -> None:
    a, b = load_checkpoint(ckpt), load_checkpoint(ckpt)
    assert a.fingerprint == b.fingerprint == model_fingerprint(ckpt / MODEL_FILE)
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0


def test_saving_same_weights_gives_same_fingerprint(
    tmp_path: Path, model: MemoryLM, codec: TextCodec
) -> None:
    # safetensors writes its header metadata in hash-map order, so the file bytes may
    # differ between saves; the content fingerprint must not
    paths = [save_checkpoint(tmp_path / f"c{i}", model, codec) for i in range(6)]
    fps = {model_fingerprint(p / MODEL_FILE) for p in paths}
    assert len(fps) == 1
    assert {load_checkpoint(p).fingerprint for p in paths} == fps
    # a reloaded model saved again is the same model
    resaved = save_checkpoint(tmp_path / "again", load_checkpoint(paths[0]).model, codec)
    assert model_fingerprint(resaved / MODEL_FILE) in fps


def test_file_sha256_is_the_file_bytes(ckpt: Path) -> None:
    import hashlib

    assert file_sha256(ckpt / MODEL_FILE) == hashlib.sha256((ckpt / MODEL_FILE).read_bytes()).hexdigest()


def test_changing_one_weight_changes_fingerprint(
    tmp_path: Path, model: MemoryLM, codec: TextCodec, cfg: ModelConfig
) -> None:
    base = model_fingerprint(save_checkpoint(tmp_path / "a", model, codec) / MODEL_FILE)
    other = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        (pool,) = other.value_parameters()
        pool.view(-1)[7] += 1e-3  # one value in the shared memory pool
    assert model_fingerprint(save_checkpoint(tmp_path / "b", other, codec) / MODEL_FILE) != base
    other = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        other.tok_emb.weight.view(-1)[0] = -other.tok_emb.weight.view(-1)[0]  # tied with the head
    assert model_fingerprint(save_checkpoint(tmp_path / "c", other, codec) / MODEL_FILE) != base
    # a fresh model with the same seed is the same weights
    same = build_model(cfg, seed=0).eval()
    assert model_fingerprint(save_checkpoint(tmp_path / "d", same, codec) / MODEL_FILE) == base


def test_fingerprint_covers_names_and_dtypes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    fps = set()
    for i, tensors in enumerate(
        [
            {"a": t},
            {"b": t},  # renamed
            {"a": t.reshape(3, 2)},  # reshaped, same bytes
            {"a": t.view(torch.int32)},  # same bytes, other dtype
            {"a": t.to(torch.bfloat16)},
            {"a": t, "b": t.clone()},
        ]
    ):
        save_file(tensors, str(tmp_path / f"{i}.safetensors"))
        fps.add(model_fingerprint(tmp_path / f"{i}.safetensors"))
    assert len(fps) == 6
    save_file({"b": t.clone(), "a": t}, str(tmp_path / "swapped.safetensors"), metadata={"x": "1"})
    assert model_fingerprint(tmp_path / "swapped.safetensors") == model_fingerprint(tmp_path / "5.safetensors")


def test_checkpoint_has_no_pickle(ckpt: Path, model: MemoryLM) -> None:
    with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
        assert (f.metadata() or {}).get("format") == "knowedit"
    # every weight is stored (tied/shared tensors under one of their names)
    assert keys <= set(model.state_dict())
    assert "pools.pool.values" in keys or "blocks.0.ffn.pool.values" in keys
    names = sorted(p.name for p in ckpt.rglob("*") if p.is_file())
    assert names == sorted([MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE])
    assert not [
        p
        for p in ckpt.rglob("*")
        if p.suffix in {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}
    ]
    assert not (ckpt / MODEL_FILE).read_bytes().startswith(b"\x80")  # pickle protocol marker


def test_loading_never_unpickles(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("load_checkpoint unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load_checkpoint(ckpt)


@pytest.mark.parametrize("name", [MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE])
def test_missing_file_raises(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"not a knowedit checkpoint.*{name}"):
        load_checkpoint(ckpt)


def test_not_a_directory_raises(tmp_path: Path) -> None:
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file")


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"\x00garbage" * 40, id="garbage"),
        pytest.param(lambda b: b[:1000], id="truncated"),
        pytest.param(lambda b: b"\xff" * 8 + b[8:], id="bad-header-length"),
        pytest.param(lambda b: b[:8] + b"[" + b[9:], id="bad-header-json"),
    ],
)
def test_corrupted_weights_raise(ckpt: Path, corrupt: object) -> None:
    path = ckpt / MODEL_FILE
    path.write_bytes(corrupt(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE} is not a readable model"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param(
            ":::: [unclosed\n\tgarbage", "config.yaml is not a valid model config", id="not-yaml"
        ),
        pytest.param("- 1\n- 2\n", "config.yaml is not a valid model config", id="a-list"),
        pytest.param("d_modl: 64\n", "d_modl", id="misspelt-key"),
        pytest.param("d_model: lots\n", "d_model", id="wrong-type"),
    ],
)
def test_garbage_config_raises(ckpt: Path, text: str, match: str) -> None:
    (ckpt / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)


def test_config_that_does_not_match_weights_raises(ckpt: Path) -> None:
    path = ckpt / CONFIG_FILE
    path.write_text(path.read_text().replace("d_model: 64", "d_model: 32"))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)


def test_garbage_tokenizer_raises(ckpt: Path) -> None:
    (ckpt / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizer"):
        load_checkpoint(ckpt)


def test_tokenizer_that_does_not_match_model_raises(ckpt: Path) -> None:
    bigger = TextCodec.train(CORPUS + ["Zor Quifa works as a lawyer in Madrid"] * 3, vocab_size=400)
    small = load_checkpoint(ckpt).codec.vocab_size
    assert bigger.vocab_size > small
    bigger.save(ckpt / TOKENIZER_FILE)
    with pytest.raises(CheckpointError, match=TOKENIZER_FILE) as info:
        load_checkpoint(ckpt)
    assert str(bigger.vocab_size) in str(info.value) and str(small) in str(info.value)


@pytest.mark.parametrize("text", ["", "  \n\n", "# only a comment\n", "null\n"])
def test_empty_config_blames_config(ckpt: Path, text: str) -> None:
    (ckpt / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is not a valid model config.*empty"):
        load_checkpoint(ckpt)


def test_config_without_vocab_size_blames_config(ckpt: Path) -> None:
    path = ckpt / CONFIG_FILE
    path.write_text(path.read_text().replace("vocab_size: ", "vocab_size: 0 #"))
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is not a valid model config.*vocab_size"):
        load_checkpoint(ckpt)


def test_save_overwrites_in_place(
    tmp_path: Path, model: MemoryLM, codec: TextCodec, cfg: ModelConfig
) -> None:
    out = save_checkpoint(tmp_path / "c", model, codec)
    other = build_model(cfg, seed=9).eval()
    save_checkpoint(out, other, codec)
    ids = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(out).model(ids), other(ids))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE]
    )
    shutil.rmtree(out)


# --- the last block in parts (what the editor runs) -------------------------------------


@pytest.mark.parametrize(
    "memory", [{}, {"swilu": False}, {"swilu": False, "value_dim": 48}, {"qk_norm": False, "value_dim": 48}]
)
def test_last_block_decomposition_equals_forward(cfg: ModelConfig, memory: dict) -> None:
    """residual_before_final_ffn -> final_select -> value read -> final_readout -> head
    is forward, and so is the editor's final-layer function at a zero change."""
    import dataclasses

    from knowedit.memory import lookup
    from knowedit.update import _FinalLayer

    # Own pools: with a shared pool, a change to the rows would move earlier layers' reads too.
    c = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, shared_values=False, **memory))
    model = build_model(c, seed=1).eval()
    assert model.final_memory() is not None
    with torch.no_grad():
        model.pools[model.final_memory().pool.name].values.normal_(0, 0.5)  # far from init, as after training
        ids = _ids(c, B=3, T=17)
        want = model(ids).reshape(-1, c.vocab_size)
        x = model.residual_before_final_ffn(ids).reshape(-1, c.d_model)
        slots, w, gate = model.final_select(x)
        mem = model.final_memory()
        read = lookup(mem.pool.values, slots, w.to(mem.pool.values.dtype), mem.cfg.backend).float()
        got = model.head(model.final_readout(x, read, gate))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        t = torch.unique(slots)
        run = _FinalLayer(model, x, t)
        assert torch.allclose(run(torch.zeros(t.numel(), mem.pool.values.shape[1])), want, atol=1e-5, rtol=1e-5)
        # a change of the read rows moves the logits exactly as a changed value table does
        delta = 0.1 * torch.randn(t.numel(), mem.pool.values.shape[1], generator=torch.Generator().manual_seed(2))
        mem.pool.values[t] += delta
        assert torch.allclose(run(delta), model(ids).reshape(-1, c.vocab_size), atol=1e-4, rtol=1e-4)


def test_target_logits_give_forwards_loss_and_gradients(cfg: ModelConfig) -> None:
    """The head at the scored positions alone: the same cross-entropy as forward's logits
    with ignore_index=-100, and the same gradient for every parameter."""
    import torch.nn.functional as F

    ids = _ids(cfg, B=3, T=11)
    targets = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(5))
    targets[0, 7:] = -100  # padding
    targets[1, :4] = -100  # an answer-only loss's prompt
    targets[2] = -100  # a row with nothing scored
    grads = []
    for use_target_logits in (False, True):
        model = build_model(cfg, seed=3).train()
        if use_target_logits:
            logits, t = model.target_logits(ids, targets)
            assert logits.shape == (int((targets != -100).sum()), cfg.vocab_size) and t.shape == logits.shape[:1]
            loss = F.cross_entropy(logits, t)
        else:
            loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        a, b = g0[n].to_dense(), g1[n].to_dense()
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), n
