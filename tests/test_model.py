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
    assert a.fingerprint == b.fingerprint == file_sha256(ckpt / MODEL_FILE)
    assert len(a.fingerprint) == 64


@pytest.mark.xfail(
    strict=True,
    reason="BUG: safetensors writes the __metadata__ map (tied-tensor aliases + format) in "
    "hash-map order, so saving the same weights twice gives different model.safetensors bytes "
    "and a different fingerprint (file_sha256); the ledger binds to that fingerprint",
)
def test_saving_same_weights_gives_same_fingerprint(
    tmp_path: Path, model: MemoryLM, codec: TextCodec
) -> None:
    fps = {
        file_sha256(save_checkpoint(tmp_path / f"c{i}", model, codec) / MODEL_FILE)
        for i in range(6)
    }
    assert len(fps) == 1


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


@pytest.mark.xfail(
    strict=True,
    reason="BUG: load_checkpoint does not check tokenizer.json against config.yaml's "
    "vocab_size; a larger tokenizer loads and later fails with an IndexError in the embedding "
    "(a traceback from `knowedit ask`)",
)
def test_tokenizer_that_does_not_match_model_raises(ckpt: Path) -> None:
    bigger = TextCodec.train(CORPUS + ["Zor Quifa works as a lawyer in Madrid"] * 3, vocab_size=400)
    assert bigger.vocab_size > load_checkpoint(ckpt).codec.vocab_size
    bigger.save(ckpt / TOKENIZER_FILE)
    with pytest.raises(CheckpointError):
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
