"""knowedit: edit the facts of memory-layer language models, audit and roll back every edit.

Quick start::

    from knowedit import Editor
    ed = Editor.open("runs/small")
    rec = ed.edit("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")
    ed.ask("The mother tongue of Danielle Darrieux is")
    ed.revert(rec.id)

Evaluation (EasyEdit's metrics, sequential edits)::

    from knowedit import evaluate
    res = evaluate.evaluate("runs/small", "edits.jsonl", n=100)

Every name is imported when first used, so ``import knowedit`` (and the
``knowedit`` command's start-up) loads neither torch nor the editor's
dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "BatchError": "knowedit.editor",
    "BatchFailed": "knowedit.editor",
    "EditError": "knowedit.editor",
    "EditFailed": "knowedit.editor",
    "EditRecord": "knowedit.editor",
    "Editor": "knowedit.editor",
    "EditOptions": "knowedit.edit_options",
    "EditRequest": "knowedit.data.records",
    "KnoweditError": "knowedit.errors",
    "MemoryConfig": "knowedit.config",
    "ModelConfig": "knowedit.config",
    "TrainConfig": "knowedit.config",
    "load_train_config": "knowedit.config",
    "model_preset": "knowedit.config",
    "ProductKeyMemory": "knowedit.memory",
    "ValuePool": "knowedit.memory",
    "usage_metrics": "knowedit.memory",
    "MemoryLM": "knowedit.model",
    "build_model": "knowedit.model",
}

__all__ = sorted([*_LAZY, "evaluate", "retrofit"])


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "retrofit"):  # modules; knowedit.retrofit(...) also calls retrofit.retrofit
        return importlib.import_module(f"knowedit.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'knowedit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
