"""The config schema: every shipped recipe loads, misspelt keys are named,
defaults < YAML < overrides, and the model presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knowedit.config import (
    DataConfig,
    LearnConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_learn_config,
    load_train_config,
    model_config_from_yaml,
    model_preset,
    to_yaml,
)
from knowedit.model import build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"
LEARN_DIR = CONFIG_DIR / "learn"
# Walk recursively: a flat listing silently skips configs in sub-folders.
# learn/ holds `knowedit learn` recipes (LearnConfig); every other one is a TrainConfig.
LEARN_RECIPES = sorted(LEARN_DIR.rglob("*.yaml"))
RECIPES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if LEARN_DIR not in p.parents)


def test_recipes_found() -> None:
    assert {"debug", "small", "base"} <= {p.stem for p in RECIPES}
    assert "sparse" in {p.stem for p in LEARN_RECIPES}


@pytest.mark.parametrize("path", LEARN_RECIPES, ids=[str(p.relative_to(CONFIG_DIR)) for p in LEARN_RECIPES])
def test_every_learn_recipe_loads_into_its_schema(path: Path) -> None:
    assert isinstance(load_learn_config(str(path)), LearnConfig)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIG_DIR)) for p in RECIPES])
def test_every_recipe_loads_into_the_schema(path: Path) -> None:
    cfg = load_train_config(str(path))
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.model.memory, MemoryConfig)
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.optim, OptimConfig)
    # What the model builder checks, without building (base is large).
    m = cfg.model
    assert m.d_model % m.n_heads == 0
    assert all(0 <= i < m.n_layers for i in m.memory_layers)
    assert m.memory.key_dim % 2 == 0
    assert m.memory.topk <= m.memory.n_keys**2
    assert m.memory.backend in ("torch", "triton", "auto")
    assert cfg.logger in ("csv", "tensorboard", "none")
    assert cfg.data.source in ("synthetic", "easyedit")


def test_defaults_without_yaml() -> None:
    assert load_train_config() == TrainConfig()
    assert load_train_config(None, []) == TrainConfig()


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_epoch: 3\n", "max_epoch"),
        ("model:\n  d_modl: 3\n", "model.d_modl"),
        ("model:\n  memory: {topkk: 3}\n", "model.memory.topkk"),
        ("data:\n  world: {entitys: 3}\n", "data.world.entitys"),
    ],
)
def test_misspelt_yaml_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_train_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.d_modl=3", "model.d_modl"),
        ("model.memory.topkk=3", "model.memory.topkk"),
        ("max_epoch=3", "max_epoch"),
        ("max_epochs=lots", "max_epochs"),  # wrong type
        ("model.memory.qk_norm=maybe", "model.memory.qk_norm"),
    ],
)
def test_bad_override_key_is_named(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}'"):
        load_train_config(str(CONFIG_DIR / "debug.yaml"), [override])


def test_override_without_equals_raises() -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_train_config(None, ["max_epochs"])


@pytest.mark.parametrize(
    "override",
    ["model.memory_layers=[0", 'name="unclosed', "name=@at", "model.memory={heads: [}"],
)
def test_malformed_override_value_raises_value_error(override: str) -> None:
    # the YAML parser's own error must not escape: the CLI only turns ValueError into a message
    with pytest.raises(ValueError, match="not valid YAML") as info:
        load_train_config(None, [override])
    assert override in str(info.value)
    with pytest.raises(ValueError, match="memory_layers"):
        load_train_config(None, ["max_epochs=2", "model.memory_layers=[0"])


@pytest.mark.parametrize(
    "text",
    ["model: [1,\n", "name: 'unclosed\n", "model:\n  d_model: 64\n d_model: 32\n", "x: !!python/object:os.system a\n"],
)
def test_malformed_yaml_raises_value_error(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match="not valid YAML") as info:
        load_train_config(path)
    assert path in str(info.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n"])
def test_yaml_list_raises_value_error(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match="must be a mapping") as info:
        load_train_config(path)
    assert path in str(info.value)


def test_missing_recipe_raises_value_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="does not exist") as info:
        load_train_config(missing)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="not a file"):
        load_train_config(str(tmp_path))


def test_non_utf8_recipe_raises_value_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ValueError, match="UTF-8"):
        load_train_config(path)


def test_empty_recipe_gives_defaults(tmp_path: Path) -> None:
    assert load_train_config(_write(tmp_path, "")) == TrainConfig()


def test_missing_interpolation_raises_value_error() -> None:
    with pytest.raises(ValueError, match="name"):
        load_train_config(None, ["name=${nope}"])


def test_overrides_beat_yaml_beat_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "name: mine\nmax_epochs: 7\nmodel:\n  d_model: 96\n  memory: {topk: 2, heads: 2}\n",
    )
    cfg = load_train_config(
        path, ["max_epochs=9", "model.memory.heads=3", "model.memory_layers=[0,2]"]
    )
    default = TrainConfig()
    assert cfg.max_epochs == 9  # override over YAML
    assert cfg.model.memory.heads == 3  # override over YAML, nested
    assert cfg.model.memory_layers == [0, 2]  # override over default
    assert cfg.name == "mine" and cfg.model.d_model == 96 and cfg.model.memory.topk == 2  # YAML
    # defaults survive beside the values set (deep merge, not replacement)
    assert cfg.seed == default.seed
    assert cfg.model.n_layers == default.model.n_layers
    assert cfg.model.memory.n_keys == default.model.memory.n_keys
    assert cfg.optim == default.optim


def test_later_override_wins() -> None:
    assert load_train_config(None, ["seed=1", "seed=2"]).seed == 2


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_train_config(str(CONFIG_DIR / "small.yaml"), ["model.vocab_size=123", "out=x/y"])
    again = load_train_config(_write(tmp_path, to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_model_preset_builds(name: str) -> None:
    cfg = model_preset(name)
    assert isinstance(cfg, ModelConfig)
    cfg.vocab_size = 50
    model = build_model(cfg, seed=0)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)
    assert len(model.memory_layers()) == len(cfg.memory_layers)


def test_model_preset_base_config() -> None:
    cfg = model_preset("base")
    assert cfg.d_model == 512 and cfg.memory.n_keys == 512
    assert cfg.d_model % cfg.n_heads == 0
    assert all(0 <= i < cfg.n_layers for i in cfg.memory_layers)
    assert cfg.memory.topk <= cfg.memory.n_keys**2 and cfg.memory.key_dim % 2 == 0


def test_model_presets_are_fresh_copies() -> None:
    a = model_preset("tiny")
    a.memory_layers.append(7)
    a.memory.topk = 1
    b = model_preset("tiny")
    assert 7 not in b.memory_layers and b.memory.topk != 1


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="'huge'.*base.*small.*tiny"):
        model_preset("huge")


# A saved config.yaml is untrusted: read as plain YAML, never resolved.


def test_saved_config_round_trips() -> None:
    cfg = TrainConfig(model=model_preset("tiny"))
    cfg.model.vocab_size = 50
    assert model_config_from_yaml(to_yaml(cfg)) == cfg.model
    assert model_config_from_yaml(to_yaml(cfg.model)) == cfg.model  # a bare ModelConfig


def test_saved_config_interpolation_is_refused_unresolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNOWEDIT_SECRET_FOR_TEST", "s3cr3t-value")
    text = "model:\n  vocab_size: 50\n  memory:\n    backend: ${oc.env:KNOWEDIT_SECRET_FOR_TEST}\n"
    with pytest.raises(ValueError, match=r"'model\.memory\.backend' holds an interpolation") as err:
        model_config_from_yaml(text)
    assert "s3cr3t-value" not in str(err.value)
    # Refused even where the interpolation is the whole model node.
    with pytest.raises(ValueError, match="'model' holds an interpolation"):
        model_config_from_yaml("model: ${oc.env:KNOWEDIT_SECRET_FOR_TEST}\n")


def test_saved_config_outside_the_model_part_is_not_parsed_by_omegaconf() -> None:
    # A literal "${" in, say, a data path (no valid interpolation) does not make the
    # checkpoint unreadable: only the model part goes to OmegaConf.
    text = "data:\n  path: /tmp/${odd\nmodel:\n  vocab_size: 50\n"
    assert model_config_from_yaml(text).vocab_size == 50


def test_saved_config_yaml_alias_is_refused() -> None:
    text = "model:\n  vocab_size: 50\n  memory_layers: &a [0, 1]\n  memory: {}\nx: *a\n"
    assert model_config_from_yaml(text).memory_layers == [0, 1]  # alias outside the model part
    bomb = "a: &a [1, 1]\nb: &b [*a, *a]\nmodel:\n  memory_layers: [*b, *b]\n"
    with pytest.raises(ValueError, match="YAML alias"):
        model_config_from_yaml(bomb)


@pytest.mark.parametrize("text", ["[1, 2]\n", "just a string\n", "model: 3\n"])
def test_saved_config_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ValueError, match="mapping"):
        model_config_from_yaml(text)
