"""knowedit: edit the facts of memory-layer language models, audit and roll back every edit.

Quick start::

    from knowedit import Editor
    ed = Editor.open("runs/small")
    rec = ed.edit("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")
    ed.ask("The mother tongue of Danielle Darrieux is")
    ed.revert(rec.id)
"""

from knowedit.config import MemoryConfig, ModelConfig, TrainConfig, load_train_config, model_preset
from knowedit.memory import ProductKeyMemory, ValuePool, usage_metrics
from knowedit.model import MemoryLM, build_model

__version__ = "0.1.0"

__all__ = [
    "EditOptions",
    "EditRecord",
    "Editor",
    "MemoryConfig",
    "MemoryLM",
    "ModelConfig",
    "ProductKeyMemory",
    "TrainConfig",
    "ValuePool",
    "build_model",
    "load_train_config",
    "model_preset",
    "usage_metrics",
]


def __getattr__(name: str) -> object:
    # The editor pulls in FAISS and SQLAlchemy; import it only when asked for.
    if name in ("Editor", "EditRecord", "EditError"):
        from knowedit import editor

        return getattr(editor, name)
    if name == "EditOptions":
        from knowedit.update import EditOptions

        return EditOptions
    raise AttributeError(f"module 'knowedit' has no attribute {name!r}")
