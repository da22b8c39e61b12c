"""Bring your own model: add product-key memory layers to a Hugging Face causal LM.

:func:`retrofit` loads a local ``transformers`` checkpoint (``AutoModelForCausalLM``
weights as safetensors, plus its ``tokenizer.json``), adds one Memory+ layer
(Berges et al. 2024, "Memory Layers at Scale") *alongside* the MLP of each chosen
decoder block, and writes a knowedit checkpoint directory that every knowedit
command opens like a model it trained itself.

Insertion point: alongside the MLP. The block's MLP keeps running and the memory
reads the same post-attention-norm input; the block adds ``mlp(h) + memory(h)`` to
the residual stream. The memory's output projection starts at zero, so before any
training the retrofitted model's logits are the original's. Replacing the MLP (and
distilling it into the memory first) would remove the MLP's parameters but would
change the model's outputs until the distillation converges, and whatever the MLP
stored outside the memory's reach would be lost; alongside, nothing the base model
knew is at risk and the memory only has to learn what is new.

The checkpoint is self-contained: ``model.safetensors`` holds the base weights
(under ``hf.``) and the memory (``memories.*``, ``pools.*``), ``config.yaml`` the
``transformers`` config and a SHA-256 fingerprint of the base weights, and
``tokenizer.json`` the original tokenizer. Loading recomputes the base fingerprint
and refuses a file whose base weights do not match it. The ledger's fingerprint
(:func:`knowedit.checkpoint.model_fingerprint` of ``model.safetensors``) covers
base and memory alike.

``transformers`` is an optional dependency (``pip install 'knowedit[hf]'``), imported
only here and only when a retrofitted model is built or loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import types
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from knowedit.config import MemoryConfig, ModelConfig
from knowedit.errors import KnoweditError
from knowedit.memory import MemoryTrace, ProductKeyMemory, RowPatch, ValuePool

KIND = "retrofit"
"""``config.yaml``'s ``kind`` for a retrofitted checkpoint."""


class RetrofitError(KnoweditError, ValueError):
    """A model directory or setting that cannot be retrofitted or loaded."""


@dataclass(frozen=True)
class Arch:
    """Where a ``transformers`` architecture keeps its decoder blocks."""

    layers: str
    """Attribute path of the decoder block list."""
    norm2: str
    """The block's norm before its MLP (its input is the residual after attention)."""
    mlp: str
    final_norm: str
    positions: str
    """The ``transformers`` config field with the context length."""
    mlp_out: str
    """The MLP's output projection (its scale sets the memory's, :meth:`RetrofitLM.balance_memory`)."""
    attn: str
    """The block's attention module."""
    attn_proj: tuple[str, ...]
    """The attention's input and output projections (``nn.Linear``, or GPT-2's ``Conv1D``)."""


_LLAMA_LIKE = Arch(
    "model.layers", "post_attention_layernorm", "mlp", "model.norm", "max_position_embeddings", "down_proj",
    "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"),
)
ARCHS: dict[str, Arch] = {
    "gpt2": Arch("transformer.h", "ln_2", "mlp", "transformer.ln_f", "n_positions", "c_proj", "attn", ("c_attn", "c_proj")),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}
"""Supported ``model_type`` values (pre-norm decoders whose block adds ``mlp(norm2(x))``)."""


@dataclass
class RetrofitSettings:
    """The ``KEY=VALUE`` settings of ``knowedit retrofit``."""

    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(n_keys=256, heads=4, topk=8, key_dim=64))
    """Memory+ settings; ``--slots N`` sets ``n_keys = sqrt(N)``."""
    seed: int = 0
    """Seeds the memory's initial keys, queries and values."""
    max_seq_len: int = 0
    """Context knowedit checks prompts against; 0: the model's (at most 4096)."""
    eos_token: str = ""
    """End-of-sequence token; empty: the tokenizer config's ``eos_token`` (or the model config's ``eos_token_id``)."""
    pad_token: str = ""
    """Padding token; empty: the tokenizer config's ``pad_token``, else the eos token."""


def _shadowing_kernels() -> Path | None:
    """knowedit's own ``kernels/`` source folder, if that is what ``import kernels`` finds.

    transformers (5.25 and later) imports the Hugging Face ``kernels`` package. knowedit's
    Triton kernels live in a top-level ``kernels/`` folder of the source tree (installed as
    ``knowedit.kernels``), so a Python started with the checkout on ``sys.path`` (``python -m``
    or ``python -c`` run from its root) finds that folder first and transformers fails deep
    inside its own imports.
    """
    import importlib.metadata
    import importlib.util

    from knowedit import kernels as own

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None  # nothing to hide (transformers before 5.25 does not need it)
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin).resolve()
    if origin == Path(own.__file__).resolve():
        return origin.parent
    # another checkout's (a worktree, a copy on PYTHONPATH): knowedit's kernel modules are in it
    return origin.parent if (origin.parent / "_lookup_triton.py").is_file() else None


def _need_transformers() -> Any:  # noqa: ANN401 - the module
    shadow = _shadowing_kernels()
    if shadow is not None:
        raise RetrofitError(
            f"{shadow} (knowedit's Triton kernels, source folder) is on sys.path as the top-level "
            "package `kernels` and hides the Hugging Face `kernels` package that transformers imports; "
            "run from outside the checkout, through the `knowedit` command, or with `python -P`"
        )
    try:
        import transformers
    except ImportError:
        raise RetrofitError("retrofitting needs transformers: pip install 'knowedit[hf]'") from None
    return transformers


def _get(obj: Any, path: str) -> Any:  # noqa: ANN401
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _Captured(Exception):
    """Raised by the last block's norm hook to stop a forward at the residual it needs."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x


@dataclass
class _BlockView:
    """What the editor reads of a block: ``ffn``, the memory layer if it has one."""

    ffn: nn.Module

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - only reached for a missing attribute
        raise RetrofitError(
            f"a retrofitted model's blocks have no {name!r}: a block view offers only `ffn` (the block's memory "
            "layer, else its MLP); the transformers blocks are under the model's `hf`"
        )


def tensors_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors in sorted name order (name, dtype, shape, bytes);
    tied tensors count once, under their first name in sorted order."""
    h = hashlib.sha256(b"knowedit-base-fingerprint/v1\n")
    seen: set[tuple[int, int]] = set()
    for name in sorted(state):
        t = state[name].detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        data = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\n")
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class RetrofitLM(nn.Module):
    """A ``transformers`` causal LM with memory layers beside chosen blocks' MLPs.

    It offers :class:`knowedit.model.MemoryLM`'s interface (``cfg``, ``pools``,
    ``blocks[i].ffn``, ``memory_layers``, ``value_parameters``, ``forward`` with
    ``trace``/``patches``/``cache``, the split last-layer path and ``head``), so the
    editor, locate, stats, eval and learn use it unchanged.

    Args:
        hf: the ``transformers`` model (``AutoModelForCausalLM``).
        cfg: ``vocab_size``, ``d_model``, ``n_layers``, ``max_seq_len``,
            ``memory_layers`` and ``memory`` are used.
        init_memory: initialise the memory (keys, queries, values; output projection
            zero). False leaves it as built (weights are loaded next).
    """

    is_retrofit = True

    def __init__(self, hf: nn.Module, cfg: ModelConfig, init_memory: bool = True) -> None:
        super().__init__()
        model_type = hf.config.model_type
        if model_type not in ARCHS:
            raise RetrofitError(unsupported(model_type))
        self.hf = hf
        self.arch = ARCHS[model_type]
        self.cfg = cfg
        self.train_base = False
        """Whether :meth:`other_parameters` includes the base weights (training)."""
        layers = _get(hf, self.arch.layers)
        bad = [i for i in cfg.memory_layers if not 0 <= i < len(layers)]
        if bad:
            raise RetrofitError(f"layer {bad[0]} is out of range: the model has {len(layers)} blocks (0..{len(layers) - 1})")
        mem = cfg.memory
        value_dim = mem.value_dim or cfg.d_model
        self.pools = nn.ModuleDict()
        self.memories = nn.ModuleDict()
        shared = ValuePool(mem.n_keys**2, value_dim, name="pool") if mem.shared_values and cfg.memory_layers else None
        if shared is not None:
            self.pools["pool"] = shared
        for i in sorted(cfg.memory_layers):
            pool = shared or ValuePool(mem.n_keys**2, value_dim, name=f"mem{i}")
            if shared is None:
                self.pools[pool.name] = pool
            m = ProductKeyMemory(cfg.d_model, mem, pool, i)
            if m.out is None:
                raise RetrofitError("a retrofitted memory needs its output projection (it starts at zero): keep memory.swilu=true")
            if init_memory:
                nn.init.zeros_(m.out.weight)
            self.memories[str(i)] = m
        self._ctx: tuple[list[MemoryTrace] | None, dict[str, RowPatch] | None] | None = None
        self._bypass = False
        self._capture = False
        self.blocks = [
            _BlockView(self.memories[str(i)] if str(i) in self.memories else _get(b, self.arch.mlp))
            for i, b in enumerate(layers)
        ]
        for i, b in enumerate(layers):
            if str(i) in self.memories:
                _get(b, self.arch.mlp).register_forward_hook(self._hook(self.memories[str(i)]), with_kwargs=True)
        _get(layers[-1], self.arch.norm2).register_forward_pre_hook(self._capture_hook)
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    # ------------------------------------------------------------- hooks
    def _hook(self, mem: ProductKeyMemory):  # noqa: ANN202
        def add_memory(_mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
            if self._bypass:
                return out
            h = args[0] if args else next(iter(kwargs.values()))
            trace, patches = self._ctx if self._ctx is not None else (None, None)
            patch = patches.get(mem.pool.name) if patches else None
            return out + mem(h, trace=trace, patch=patch).to(out.dtype)

        return add_memory

    def _capture_hook(self, _mod: nn.Module, args: tuple) -> None:
        if self._capture:
            raise _Captured(args[0])

    # -------------------------------------------------------- structure
    @property
    def head(self) -> nn.Module:
        """The output embedding (``lm_head``)."""
        return self.hf.get_output_embeddings()

    @property
    def norm(self) -> nn.Module:
        """The final norm before the head."""
        return _get(self.hf, self.arch.final_norm)

    def _last(self) -> tuple[nn.Module, nn.Module]:
        last = _get(self.hf, self.arch.layers)[-1]
        return _get(last, self.arch.norm2), _get(last, self.arch.mlp)

    def train(self, mode: bool = True) -> RetrofitLM:
        """Train mode for the memory; the base stays in eval mode (no dropout), so a
        frozen base computes exactly what it did before the retrofit."""
        super().train(mode)
        self.hf.eval()
        return self

    def memory_layers(self) -> list[ProductKeyMemory]:
        return [self.memories[k] for k in sorted(self.memories, key=int)]

    def value_parameters(self) -> list[nn.Parameter]:
        """The memory value tables, for their own optimizer group and learning rate."""
        return [p.values for p in self.pools.values()]

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.hf.parameters())

    def other_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not a memory value table; the base weights only
        when :attr:`train_base` is set (they are frozen by default)."""
        vals = {id(p) for p in self.value_parameters()}
        base = set() if self.train_base else {id(p) for p in self.hf.parameters()}
        return [p for p in self.parameters() if id(p) not in vals and id(p) not in base]

    @torch.no_grad()
    def balance_memory(self) -> dict[str, float]:
        """Move scale between each memory's value table and its output projection so
        the projection's RMS equals that of the block MLP's output projection; the
        function is unchanged (``out((V / s) ...) * s``, up to rounding).

        After training on facts the base already knows, the output projection stays
        small and the values large: editing a value row (whose step size the editor
        sets in value units) then barely moves the logits. Balanced, a row change
        moves them as much as in a memory layer that carries the block's knowledge.

        Returns:
            pool name -> the factor ``s`` the projection was multiplied by.
        """
        layers = _get(self.hf, self.arch.layers)
        done: dict[str, float] = {}
        for i, mem in ((m.layer, m) for m in self.memory_layers()):
            assert mem.out is not None
            want = _get(_get(layers[i], self.arch.mlp), self.arch.mlp_out).weight.float().pow(2).mean().sqrt()
            have = mem.out.weight.float().pow(2).mean().sqrt()
            if mem.pool.name in done or have <= 0 or not torch.isfinite(want / have):
                continue
            s = float(want / have)
            if self.cfg.memory.shared_values:
                continue  # one table behind several projections: left as trained
            mem.out.weight.mul_(s)
            mem.pool.values.div_(s)
            done[mem.pool.name] = s
        return done

    def lora_targets(self) -> dict[str, nn.Module]:
        """The projections LoRA adapts (:func:`knowedit.baselines.lora_targets`), by state-dict
        name: every block's attention input and output projections and its MLP's output
        projection, and each memory layer's ``out``. ``nn.Linear``, or GPT-2's ``Conv1D``."""
        out: dict[str, nn.Module] = {}
        a = self.arch
        for i, block in enumerate(_get(self.hf, a.layers)):
            prefix = f"hf.{a.layers}.{i}"
            for name in a.attn_proj:
                out[f"{prefix}.{a.attn}.{name}"] = _get(block, f"{a.attn}.{name}")
            out[f"{prefix}.{a.mlp}.{a.mlp_out}"] = _get(block, f"{a.mlp}.{a.mlp_out}")
            mem = self.memories[str(i)] if str(i) in self.memories else None
            if mem is not None and mem.out is not None:
                out[f"memories.{i}.out"] = mem.out
        return out

    def base_fingerprint(self) -> str:
        """:func:`tensors_fingerprint` of the base model's state dict."""
        return tensors_fingerprint(self.hf.state_dict())

    # ----------------------------------------------------------- forward
    def forward(
        self,
        idx: torch.Tensor,
        trace: list[MemoryTrace] | None = None,
        patches: dict[str, RowPatch] | None = None,
        cache: list[Any] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab); see :meth:`knowedit.model.MemoryLM.forward`.

        ``cache`` (``[]`` before the prompt's call) holds the ``transformers`` cache
        between greedy-decoding calls.
        """
        T = idx.shape[1]
        past = cache[0] if cache else None
        start = int(past.get_seq_length()) if past is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.max_seq_len}")
        self._ctx = (trace, patches)
        try:
            kwargs: dict[str, Any] = {"use_cache": cache is not None}
            if past is not None:
                kwargs[self._cache_kw] = past
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                out = self.hf(input_ids=idx, **kwargs)
        finally:
            self._ctx = None
        if cache is not None:
            new = getattr(out, "cache", None)
            cache[:] = [new if new is not None else out.past_key_values]
        return out.logits

    def target_logits(
        self, idx: torch.Tensor, targets: torch.Tensor, trace: list[MemoryTrace] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`knowedit.model.MemoryLM.target_logits`: logits (N, V) where ``targets``
        is not -100, and those targets (the base model runs its own head everywhere)."""
        keep = targets != -100
        return self(idx, trace)[keep], targets[keep]

    def final_memory(self) -> ProductKeyMemory | None:
        """The memory layer of the last block, if the last block has one."""
        return self.memories[str(self.cfg.n_layers - 1)] if str(self.cfg.n_layers - 1) in self.memories else None

    def residual_before_final_ffn(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C): the residual stream after the last block's attention
        (the input of its post-attention norm)."""
        self._capture = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.hf(input_ids=idx, use_cache=False)
        except _Captured as got:
            return got.x
        finally:
            self._capture = False
        raise RuntimeError("the last block's norm was not reached")

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        _, mlp = self._last()
        self._bypass = True
        try:
            return mlp(h)
        finally:
            self._bypass = False

    def final_residual(self, x_mid: torch.Tensor) -> torch.Tensor:
        """See :meth:`knowedit.model.MemoryLM.final_residual`: ``x_mid`` plus the last
        block's MLP (frozen while editing), which the memory sits beside."""
        norm2, _ = self._last()
        return x_mid + self._mlp(norm2(x_mid))

    def final_select(self, x_mid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """See :meth:`knowedit.model.MemoryLM.final_select`."""
        mem = self.final_memory()
        if mem is None:
            raise ValueError("the last block has no memory layer")
        norm2, _ = self._last()
        h = norm2(x_mid)
        _, ids, w = mem.select(h)
        gate = F.silu(mem.gate(h)).float() if mem.gate is not None else None
        return ids.flatten(-2), w.flatten(-2).float(), gate

    def final_readout(
        self, x_mid: torch.Tensor, read: torch.Tensor, gate: torch.Tensor | None, resid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """See :meth:`knowedit.model.MemoryLM.final_readout`; the block's MLP is in ``resid``."""
        mem = self.final_memory()
        assert mem is not None and mem.out is not None
        y = read if gate is None else read * gate
        y = mem.out(y.to(x_mid.dtype))
        return self.norm((self.final_residual(x_mid) if resid is None else resid) + y)

    def logits_from_final_ffn(self, x_mid: torch.Tensor, patches: dict[str, RowPatch] | None = None) -> torch.Tensor:
        """(..., C) residual after the last attention -> (..., V) logits (position-wise)."""
        norm2, _ = self._last()
        h = norm2(x_mid)
        y = self._mlp(h)
        mem = self.final_memory()
        if mem is not None:
            patch = patches.get(mem.pool.name) if patches else None
            y = y + mem(h.unsqueeze(0), patch=patch).squeeze(0)
        return self.head(self.norm(x_mid + y))


def unsupported(model_type: str) -> str:
    return f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ARCHS))})"


# ---------------------------------------------------------------- building
def _hf_config_from_dict(d: dict) -> Any:  # noqa: ANN401
    tf = _need_transformers()
    mt = d.get("model_type")
    if mt not in ARCHS:
        raise RetrofitError(unsupported(str(mt)))
    return tf.CONFIG_MAPPING[mt].from_dict(d)


def build_hf(hf_config: Any) -> nn.Module:  # noqa: ANN401
    """An untrained ``transformers`` causal LM of ``hf_config`` (float32, eager attention)."""
    tf = _need_transformers()
    tf.logging.set_verbosity_error()  # e.g. its advice to pass an attention mask: batches are right-padded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)


def model_config(hf_config: Any, layers: Sequence[int], memory: MemoryConfig, max_seq_len: int = 0) -> ModelConfig:  # noqa: ANN401
    """knowedit's :class:`ModelConfig` view of a retrofitted model."""
    arch = ARCHS[hf_config.model_type]
    ctx = int(getattr(hf_config, arch.positions, 0) or 0)
    return ModelConfig(
        vocab_size=int(hf_config.vocab_size),
        d_model=int(hf_config.hidden_size),
        n_layers=int(hf_config.num_hidden_layers),
        n_heads=int(hf_config.num_attention_heads),
        max_seq_len=max_seq_len or min(ctx, 4096) or 2048,
        memory_layers=sorted(layers),
        memory=memory,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def _token_content(v: object) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _special_tokens(hf_dir: Path, tok: Any, hf_config: Any, s: RetrofitSettings) -> tuple[str, str]:  # noqa: ANN401
    """(pad, eos) token strings for the codec."""
    tc: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = hf_dir / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise RetrofitError(f"{f} is not valid JSON") from None
            if isinstance(data, dict):
                tc = {**data, **tc}
    eos = s.eos_token or _token_content(tc.get("eos_token"))
    if not eos:
        eid = getattr(hf_config, "eos_token_id", None)
        eid = eid[0] if isinstance(eid, list) and eid else eid
        eos = tok.id_to_token(eid) if isinstance(eid, int) else None
    if not eos:
        raise RetrofitError(f"{hf_dir}: no end-of-sequence token in tokenizer_config.json or config.json; give eos_token=TOKEN")
    pad = s.pad_token or _token_content(tc.get("pad_token")) or eos
    for what, t in (("eos_token", eos), ("pad_token", pad)):
        if tok.token_to_id(t) is None:
            raise RetrofitError(f"{hf_dir / 'tokenizer.json'} has no token {t!r} ({what})")
    return pad, eos


def _check_hf_dir(hf_dir: Path) -> tuple[Any, Path]:  # noqa: ANN401
    """The ``transformers`` config of a local causal-LM directory, checked, and its tokenizer file."""
    if not hf_dir.is_dir():
        raise RetrofitError(f"{hf_dir} is not a directory")
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise RetrofitError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise RetrofitError(f"{cfg_file} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise RetrofitError(f"{cfg_file} is not a model config (not a JSON object)")
    archs = raw.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise RetrofitError(f"{hf_dir} is not a causal language model (architectures: {', '.join(map(str, archs))})")
    mt = raw.get("model_type")
    if mt not in ARCHS:
        raise RetrofitError(f"{hf_dir}: {unsupported(str(mt))}")
    has_weights = (hf_dir / "model.safetensors").is_file() or (hf_dir / "model.safetensors.index.json").is_file()
    if not has_weights:
        bins = [p.name for p in hf_dir.glob("*.bin")]
        extra = f" ({bins[0]} is a pickle, which knowedit never loads)" if bins else ""
        raise RetrofitError(f"{hf_dir} has no model.safetensors{extra}")
    tok_file = hf_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise RetrofitError(f"{hf_dir} has no tokenizer.json (knowedit needs the fast Hugging Face tokenizer file)")
    try:
        hf_config = _hf_config_from_dict(raw)
    except RetrofitError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise RetrofitError(f"{cfg_file} is not a valid {mt} config: {' '.join(str(err).split())}") from None
    return hf_config, tok_file


def load_settings(overrides: Sequence[str] = ()) -> RetrofitSettings:
    """:class:`RetrofitSettings` from ``KEY=VALUE`` overrides (e.g. ``memory.topk=16``)."""
    from knowedit.config import load_config

    try:
        s: RetrofitSettings = load_config(RetrofitSettings, None, list(overrides))  # type: ignore[assignment]
    except ValueError as err:
        raise RetrofitError(str(err)) from None
    return s


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """``"1,3"`` -> [1, 3] (negative indices count from the end); None: the last block."""
    if text is None or not text.strip():
        return [n_layers - 1]
    out = []
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise RetrofitError(f"--layers must be comma-separated block indices, got {text!r}") from None
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise RetrofitError(f"layer {i} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
        out.append(j)
    return sorted(set(out))


def retrofit(
    hf_dir: str | Path,
    out: str | Path,
    layers: Sequence[int] | str | None = None,
    slots: int | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Add memory layers to a local Hugging Face causal LM and write a knowedit checkpoint.

    Args:
        hf_dir: a ``save_pretrained`` directory: ``config.json``, ``model.safetensors``
            (or a sharded index), ``tokenizer.json`` (+ ``tokenizer_config.json``).
        out: the new checkpoint directory (must not exist, or be empty).
        layers: block indices (or ``"1,3"``) that get a memory layer; default the last.
        slots: value slots per memory layer (a perfect square); default ``memory.n_keys ** 2``.
        overrides: ``KEY=VALUE`` :class:`RetrofitSettings`, e.g. ``memory.topk=16``.

    Returns:
        A summary: the layers, slots, parameter counts, fingerprints.

    Raises:
        RetrofitError: one line; nothing is written.
    """
    s = load_settings(overrides)
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise RetrofitError(f"{out} already exists; retrofit into a new (or empty) directory")
    hf_config, tok_file = _check_hf_dir(hf_dir)
    n_layers = int(hf_config.num_hidden_layers)
    layer_list = parse_layers(layers, n_layers) if isinstance(layers, str) or layers is None else parse_layers(
        ",".join(map(str, layers)), n_layers
    )
    if slots is not None:
        n = math.isqrt(slots)
        if slots < 4 or n * n != slots:
            raise RetrofitError(f"--slots must be a perfect square of at least 4 (product keys: n_keys ** 2), got {slots}")
        s.memory.n_keys = n
    if s.memory.topk > s.memory.n_keys**2:
        raise RetrofitError(f"memory.topk={s.memory.topk} exceeds the {s.memory.n_keys ** 2} slots")
    if s.memory.key_dim % 2:
        raise RetrofitError("memory.key_dim must be even (two half keys)")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as err:  # noqa: BLE001
        raise RetrofitError(f"{tok_file} is not a valid tokenizer: {' '.join(str(err).split())}") from None
    pad, eos = _special_tokens(hf_dir, tok, hf_config, s)
    tf = _need_transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tf.logging.set_verbosity_error()
            tf.logging.disable_progress_bar()
            hf = tf.AutoModelForCausalLM.from_pretrained(
                str(hf_dir), dtype=torch.float32, attn_implementation="eager", use_safetensors=True, local_files_only=True
            )
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise RetrofitError(f"cannot load the weights of {hf_dir}: {' '.join(str(err).split())[:300]}") from None
    hf.eval()
    if tok.get_vocab_size() > hf.config.vocab_size:
        raise RetrofitError(
            f"{tok_file} has {tok.get_vocab_size()} tokens but the model's vocabulary is {hf.config.vocab_size}"
        )
    cfg = model_config(hf.config, layer_list, s.memory, s.max_seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = RetrofitLM(hf, cfg)
    base_fp = model.base_fingerprint()
    meta = {"source": str(hf_dir.resolve()), "source_fingerprint": base_fp, "pad_token": pad, "eos_token": eos}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise RetrofitError(f"cannot write {out}: {err.strerror or err}") from None
    try:
        save_retrofit(tmp, model, tok_file.read_bytes(), meta)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise RetrofitError(f"cannot write {out}: {err.strerror or err}") from None
        raise
    n_base = sum(p.numel() for p in model.hf.parameters())
    n_mem = sum(p.numel() for p in model.memories.parameters())
    from knowedit.checkpoint import MODEL_FILE, model_fingerprint

    return {
        "out": str(out), "architecture": hf.config.model_type, "layers": layer_list, "slots": s.memory.n_keys**2,
        "base_parameters": n_base, "memory_parameters": n_mem, "base_fingerprint": base_fp,
        "fingerprint": model_fingerprint(out / MODEL_FILE), "eos_token": eos, "pad_token": pad,
    }


# ------------------------------------------------------------ save / load
def _config_text(model: RetrofitLM, meta: dict) -> str:
    data = {
        "kind": KIND,
        "model": asdict(model.cfg),
        "base": {
            "architecture": model.hf.config.model_type,
            "hf_config": json.loads(model.hf.config.to_json_string(use_diff=False)),
            "fingerprint": model.base_fingerprint(),
            **meta,
        },
    }
    return yaml.safe_dump(data, sort_keys=False)


def save_retrofit(path: str | Path, model: RetrofitLM, tokenizer_json: bytes | None = None, meta: dict | None = None) -> Path:
    """Write a retrofitted checkpoint directory (``model.safetensors``, ``config.yaml``,
    ``tokenizer.json``). ``meta`` (source, pad/eos tokens) defaults to the model's own
    (set when it was loaded)."""
    from safetensors.torch import save_model

    from knowedit.checkpoint import (
        CONFIG_FILE,
        MODEL_FILE,
        TOKENIZER_FILE,
        _atomic_write_text,
        plain_file_mode,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta if meta is not None else getattr(model, "retrofit_meta", {}))
    tmp = out / f".{MODEL_FILE}.tmp"
    save_model(model, str(tmp), metadata={"format": "knowedit", "kind": KIND})
    os.chmod(tmp, plain_file_mode())
    os.replace(tmp, out / MODEL_FILE)
    _atomic_write_text(out / CONFIG_FILE, _config_text(model, meta))
    if tokenizer_json is not None:
        (out / TOKENIZER_FILE).write_bytes(tokenizer_json)
    return out


def is_retrofit_config(text: str) -> bool:
    """Whether a ``config.yaml`` text is a retrofitted checkpoint's."""
    if "kind:" not in text:
        return False
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def load_retrofit(p: Path, config_text: str, device: str | torch.device = "cpu") -> Any:  # noqa: ANN401
    """Load a retrofitted checkpoint directory (see :func:`knowedit.checkpoint.load_checkpoint`).

    Raises:
        CheckpointError: a bad config, tokenizer or weights file, or base weights that
            do not match the fingerprint recorded in ``config.yaml``.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import load_model

    from knowedit.checkpoint import (
        CONFIG_FILE,
        MODEL_FILE,
        TOKENIZER_FILE,
        Checkpoint,
        CheckpointError,
        _file_shapes,
        model_fingerprint,
    )
    from knowedit.config import _refuse_interpolations
    from knowedit.tokenizer import TextCodec

    where = p / CONFIG_FILE
    try:
        data = yaml.safe_load(config_text)
        _refuse_interpolations(data, "")
        base = data["base"]
        cfg: ModelConfig = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(data["model"]))
        )  # type: ignore[assignment]
        hf_config = _hf_config_from_dict(dict(base["hf_config"]))
        recorded = str(base["fingerprint"])
        pad, eos = str(base["pad_token"]), str(base["eos_token"])
    except RetrofitError as err:
        raise CheckpointError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - yaml/omegaconf/transformers raise many types
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{where} is not a valid retrofit config: {detail}") from None
    try:
        codec = TextCodec.load(p / TOKENIZER_FILE, pad_token=pad, eos_token=eos)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{p / TOKENIZER_FILE} is not a valid tokenizer: {err}") from None
    try:
        with torch.device("meta"):
            meta_model = RetrofitLM(build_hf(hf_config), cfg, init_memory=False)
    except RetrofitError as err:
        raise CheckpointError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{where} is not a valid retrofit config: {' '.join(str(err).split())}") from None
    stored = _file_shapes(p / MODEL_FILE)
    params = meta_model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, t in params.items():
        aliases.setdefault(id(t), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in stored for n in names)]
    unexpected = [n for n in stored if n not in params]
    wrong = [n for n, shape in stored.items() if n in params and list(params[n].shape) != shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{p / MODEL_FILE} does not match {CONFIG_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {wrong[:3]})"
        )
    del meta_model
    try:
        model = RetrofitLM(build_hf(hf_config), cfg, init_memory=False)
        missing_keys, unexpected_keys = load_model(model, str(p / MODEL_FILE), strict=False)
        fingerprint = model_fingerprint(p / MODEL_FILE)
    except MemoryError:
        raise CheckpointError(f"not enough memory to load the model in {p}") from None
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{p / MODEL_FILE} is not a readable model: {' '.join(str(err).split())}") from None
    if missing_keys or unexpected_keys:
        raise CheckpointError(f"{p / MODEL_FILE} does not match config.yaml (missing {missing_keys[:3]})")
    got = model.base_fingerprint()
    if got != recorded:
        raise CheckpointError(
            f"{p / MODEL_FILE}: the base weights do not match the base this checkpoint was made from "
            f"(sha256 {got[:16]}..., config.yaml records {recorded[:16]}...)"
        )
    model.retrofit_meta = {k: v for k, v in base.items() if k in ("source", "source_fingerprint", "pad_token", "eos_token")}
    model.tokenizer_json = (p / TOKENIZER_FILE).read_bytes()
    model.to(device).eval()
    return Checkpoint(model, codec, cfg, p, fingerprint)


class _CallableModule(types.ModuleType):
    """``knowedit.retrofit(...)`` calls :func:`retrofit` (the module stays importable as usual)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return retrofit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
