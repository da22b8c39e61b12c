"""A reduced run of ``bench/ledger_battery.py`` (the full one is in
docs/benchmarks.md): a few random apply/revert steps, three SIGKILLs (mid-commit,
inside a cascade revert, during the first slot-statistics write) and a few
tamper kinds; every count must be 0."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ledger_battery", REPO / "bench" / "ledger_battery.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TAMPER_KINDS = {
    "row after bytes changed (after = before)",
    "revert event deleted (middle)",
    "file truncated to half",
    "keyed: row changed, hashes recomputed without the key",
}


@pytest.mark.slow
def test_reduced_ledger_battery_loses_nothing(tiny_ckpt: Path, tmp_path: Path) -> None:
    bench = _bench()
    pristine = bench.copy_model(tiny_ckpt, tmp_path / "pristine", stats=False)
    seeded = bench.copy_model(tiny_ckpt, tmp_path / "seeded", stats=True)

    rnd = bench.battery_random(seeded, tmp_path, seed=3, steps=8)
    assert (rnd["lost"], rnd["half_applied"], rnd["mismatched_steps"]) == (0, 0, 0), rnd
    assert rnd["final_bit_identical"] and rnd["problems"] == [] and rnd["unexpected_errors"] == [], rnd

    kill = bench.battery_sigkill(
        pristine, seeded, tmp_path, seed=3, kills=3, modes=["commit_start", "in_txn_revert", "stats_between"]
    )
    assert kill["cases"] == 3 and kill["child_errors"] == 0, kill["kills"]
    assert (kill["lost"], kill["half_applied"]) == (0, 0), kill["kills"]
    assert kill["final_bit_identical"] and kill["base_checkpoint_unchanged"], kill
    assert all(not r["pending_committed"] for r in kill["kills"] if r["mode"] != "stats_between"), kill["kills"]

    tamper = bench.battery_tamper(seeded, tmp_path, select=TAMPER_KINDS.__contains__)
    assert tamper["cases"] == 7, tamper["kinds"]  # three kinds on both ledgers, one keyed only
    assert tamper["undetected"] == 0, tamper["undetected_kinds"]
