"""Shared fixtures: a small model trained once per session with the debug recipe.

The test machine has two cores shared with other jobs; one intra-op thread keeps
the tiny models fast (oversubscribed BLAS threads made a training step ~10x slower).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipes" / "configs"

#: Overrides that make the debug recipe learn part of its world in a few seconds
#: (about a quarter of the facts right: both outcomes occur, which the
#: greedy-vs-teacher-forced agreement test needs).
DEBUG_OVERRIDES = [
    "max_epochs=15",
    "data.batch_size=16",
    "optim.lr=1e-2",
    "optim.value_lr=1e-1",
    "optim.warmup_steps=5",
    "logger=csv",
]


@pytest.fixture(scope="session")
def debug_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint directory of the debug recipe, trained once for the whole session.

    Read-only for tests: copy it before changing anything inside.
    """
    from knowedit.config import load_train_config
    from knowedit.recipes.train import train

    out = tmp_path_factory.mktemp("debug_ckpt")
    cfg = load_train_config(str(CONFIG_DIR / "debug.yaml"), DEBUG_OVERRIDES)
    cfg.out = str(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's small-dataset advice
        train(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint directory of ``recipes/configs/tiny.yaml`` (with ``edits.jsonl``),
    trained once per session, with its background slot statistics already built
    (so that copies never compute or write them, e.g. two processes at once).

    Read-only for tests: ``shutil.copytree`` it before opening an Editor on it.
    """
    from knowedit.checkpoint import load_checkpoint
    from knowedit.config import load_train_config
    from knowedit.data import read_examples
    from knowedit.recipes.train import train
    from knowedit.side_files import CORPUS_FILE, build_stats

    out = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = load_train_config(str(CONFIG_DIR / "tiny.yaml"), ["logger=none"])
    cfg.out = str(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's small-dataset advice
        train(cfg, progress=False)
    build_stats(load_checkpoint(out), read_examples(out / CORPUS_FILE))
    return out


@pytest.fixture
def model_dir(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`tiny_ckpt` (its statistics built, no ledger), free to change."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture
def runner() -> Iterator[object]:
    """A Typer ``CliRunner`` for driving ``knowedit`` in-process."""
    from typer.testing import CliRunner

    yield CliRunner()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards).

    ``KNOWEDIT_TEST_POSTGRES_URL`` names a server (``.ci/postgres.sh`` starts one
    on loopback); without it the test is skipped, except in CI, where it fails.
    """
    import uuid

    from sqlalchemy import create_engine, make_url

    admin_url = os.environ.get("KNOWEDIT_TEST_POSTGRES_URL")
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: .ci/run sets KNOWEDIT_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL server (set KNOWEDIT_TEST_POSTGRES_URL, e.g. from .ci/postgres.sh)")
    name = f"knowedit_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as con:
            con.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
