"""Bring your own model: retrofit tiny ``transformers`` models (Llama and GPT-2 configs)
built locally, train their memory, and run knowedit's commands on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

from knowedit.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from knowedit.cli.app import app  # noqa: E402
from knowedit.config import WorldConfig  # noqa: E402
from knowedit.data import Example, load_records, make_world, write_jsonl  # noqa: E402
from knowedit.inference import greedy, greedy_exact  # noqa: E402
from knowedit.retrofit import retrofit  # noqa: E402
from knowedit.tokenizer import TextCodec, corpus_texts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEMORY = ["memory.key_dim=32", "memory.topk=4", "memory.heads=2"]
WORLD = WorldConfig(entities=20, relations=2, phrasings=3, held_out=1, objects_per_relation=6)


def _hf_config(arch: str, codec: TextCodec, seed_layers: int = 2):  # noqa: ANN202
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if arch in ("qwen2", "mistral"):
        cls = Qwen2Config if arch == "qwen2" else MistralConfig
        return cls(vocab_size=codec.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=seed_layers,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                   eos_token_id=codec.eos_id, pad_token_id=codec.pad_id, bos_token_id=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=codec.vocab_size, n_embd=64, n_layer=seed_layers, n_head=2, n_positions=64,
                          eos_token_id=codec.eos_id, bos_token_id=codec.eos_id)
    return LlamaConfig(vocab_size=codec.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=seed_layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       eos_token_id=codec.eos_id, pad_token_id=codec.pad_id, bos_token_id=None, tie_word_embeddings=True)


def _save_hf(model: torch.nn.Module, codec: TextCodec, out: Path, tokenizer_config: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    codec.save(out / "tokenizer.json")
    if tokenizer_config:  # the GPT-2 directory has none: the eos comes from config.json's eos_token_id
        (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("world")
    w = make_world(WORLD)
    ex = w.train_examples()
    write_jsonl(d / "corpus.jsonl", [asdict(e) for e in ex])
    write_jsonl(d / "edits.jsonl", [e.to_dict() for e in w.edit_requests()])
    return {"dir": d, "examples": ex, "codec": TextCodec.train(corpus_texts(ex), vocab_size=300)}


@pytest.fixture(scope="module")
def hf_dirs(world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained tiny Llama, GPT-2, Qwen2 and Mistral models, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ("llama", "gpt2", "qwen2", "mistral"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(_hf_config(arch, world["codec"]))
        out[arch] = _save_hf(m, world["codec"], tmp_path_factory.mktemp(arch), tokenizer_config=arch == "llama")
    return out


@pytest.fixture(scope="module")
def pretrained(world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained from scratch on the world: the stand-in for a user's model."""
    from transformers import AutoModelForCausalLM

    from knowedit.inference import encode_examples

    codec = world["codec"]
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(_hf_config("llama", codec), attn_implementation="eager")
    b = encode_examples(codec, world["examples"], 64, answer_only=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(m(input_ids=b.ids).logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return _save_hf(m, codec, tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def trained(pretrained: Path, world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``knowedit retrofit`` + ``knowedit train-memory`` on the stand-in (memory in the last block)."""
    d = tmp_path_factory.mktemp("trained")
    r = CliRunner().invoke(app, ["retrofit", "--from", str(pretrained), "--out", str(d / "rf"), "--slots", "1024", *MEMORY])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train-memory", str(d / "rf"), "--data", str(world["dir"] / "corpus.jsonl"),
                                 "--out", str(d / "mem"), "max_epochs=15", "logger=none", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    return d / "mem"


def _one_line_failure(r, *phrases: str) -> None:  # noqa: ANN001
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    text = " ".join(r.output.split())
    for p in phrases:
        assert p in text, r.output


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
def test_logits_equal_before_training(arch: str, hf_dirs: dict[str, Path], world: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    report = retrofit(hf_dirs[arch], tmp_path / "rf", layers="0,1", slots=256, overrides=MEMORY)
    assert report["layers"] == [0, 1] and report["memory_parameters"] > 0
    ck = load_checkpoint(tmp_path / "rf")
    orig = AutoModelForCausalLM.from_pretrained(hf_dirs[arch], attn_implementation="eager").eval()
    x = torch.randint(0, ck.codec.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = orig(input_ids=x).logits, ck.model(x)
        assert (want - got).abs().max().item() <= 1e-6
        # The editor's split path composes to the forward: prefix, then the last block's MLP + memory + head.
        x_mid = ck.model.residual_before_final_ffn(x)
        assert torch.allclose(ck.model.logits_from_final_ffn(x_mid), got, atol=1e-5)
        ids, w, gate = ck.model.final_select(x_mid.flatten(0, 1))
        mem = ck.model.final_memory()
        read = (mem.pool.values[ids] * w[..., None]).sum(1)
        logits = ck.model.head(ck.model.final_readout(x_mid.flatten(0, 1), read, gate))
        assert torch.allclose(logits, got.flatten(0, 1), atol=1e-5)
    # Cached greedy decoding gives what a full rerun of the prefix gives.
    prompts = [e.prompt for e in world["examples"][:3]]
    cached = greedy(ck.model, ck.codec, prompts, max_new_tokens=5)
    for p, c in zip(prompts, cached):
        ids_ = torch.tensor([ck.codec.encode_prompt(p)])
        toks = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(ck.model(ids_)[0, -1].argmax())
                if nxt == ck.codec.eos_id:
                    break
                toks.append(nxt)
                ids_ = torch.cat([ids_, torch.tensor([[nxt]])], 1)
        assert ck.codec.decode(toks) == c
    # The checkpoint is self-contained: the original directory is not needed.
    cfg = (tmp_path / "rf" / "config.yaml").read_text()
    assert "kind: retrofit" in cfg and report["base_fingerprint"] in cfg


def test_train_edit_ask_revert_verify(trained: Path, world: dict, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    report = json.loads((trained / "train_report.json").read_text())
    assert report["train_base"] is False and report["train_greedy_accuracy"] >= 0.9
    model = tmp_path / "m"
    shutil.copytree(trained, model)
    before = load_file(model / "model.safetensors")
    runner = CliRunner()
    req = load_records(world["dir"] / "edits.jsonl")[0]
    r = runner.invoke(app, ["ask", req.prompt, "-m", str(model), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["answer"] == req.ground_truth, r.output
    r = runner.invoke(app, ["edit", "apply", "-m", str(model), "-p", req.prompt, "-t", req.target_new, "-s", req.subject, "--json"])
    assert r.exit_code == 0, r.output
    edit_id = json.loads(r.output)["applied"][0]["id"] if "applied" in json.loads(r.output) else json.loads(r.output)["id"]
    r = runner.invoke(app, ["ask", req.prompt, "-m", str(model), "--json"])
    assert json.loads(r.output)["answer"] == req.target_new, r.output
    for cmd in (["ledger", "verify", "-m", str(model)], ["stats", "-m", str(model), "--json"],
                ["locate", "-m", str(model), "-p", req.prompt, "-t", req.target_new, "--json"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 0, (cmd, r.output)
    r = runner.invoke(app, ["edit", "revert", edit_id, "-m", str(model)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ask", req.prompt, "-m", str(model), "--json"])
    assert json.loads(r.output)["answer"] == req.ground_truth
    r = runner.invoke(app, ["ledger", "verify", "-m", str(model)])
    assert r.exit_code == 0, r.output
    # Bit for bit: the live model after the revert is the base checkpoint, which never changed.
    from knowedit.editor import Editor

    with Editor.open(model) as ed:
        live = {k: v.detach() for k, v in ed.model.state_dict().items()}
    after = load_file(model / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(live[k], before[k]) for k in before)


@pytest.mark.slow
def test_sequential_edits_and_eval(trained: Path, world: dict, tmp_path: Path) -> None:
    """Ten edits in a row: reliable and local; eval and learn run on the retrofitted model."""
    import shutil

    from knowedit.editor import Editor

    model = tmp_path / "m"
    shutil.copytree(trained, model)
    reqs = load_records(world["dir"] / "edits.jsonl")[:10]
    ex = world["examples"]
    with Editor.open(model) as ed:
        base_ok = greedy_exact(ed.model, ed.codec, ex)
        for r in reqs:
            ed.edit(r.prompt, r.target_new, subject=r.subject, allow_failed=True)
        rel = greedy_exact(ed.model, ed.codec, [Example(r.prompt, r.target_new) for r in reqs])
        edited = {(r.subject, r.ground_truth) for r in reqs}
        keep = [e for e, ok in zip(ex, base_ok) if ok and not any(s in e.prompt and e.answer == a for s, a in edited)]
        loc = greedy_exact(ed.model, ed.codec, keep)
    assert sum(rel) / len(rel) >= 0.9, rel
    assert sum(loc) / len(loc) >= 0.95
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "-m", str(trained), "--edits", str(world["dir"] / "edits.jsonl"), "--n", "3", "--json"])
    assert r.exit_code == 0, r.output
    new = tmp_path / "new.txt"
    new.write_text("Zorvath Quellin was born in Brindlemoor.\nThe river Ostrel flows into the Pale Sea.\n")
    r = runner.invoke(app, ["learn", "-m", str(model), "--data", str(new), "epochs=2", "guard_docs=0", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["learn", "-m", str(model), "--data", str(new), "--config", "lora", "--out", str(tmp_path / "lora"),
                            "epochs=1", "--quiet"])
    assert r.exit_code == 0, r.output
    load_checkpoint(tmp_path / "lora")


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_lora_on_conv1d_merges_exactly() -> None:
    """GPT-2's Conv1D stores its weight as (in, out): the adapter acts in output space
    and the merge adds the transposed update, so the output is the same before and after."""
    from transformers.pytorch_utils import Conv1D

    from knowedit.baselines import LoRA, projection_features

    torch.manual_seed(0)
    conv = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs: weight (6, 5)
    torch.nn.init.normal_(conv.weight, std=0.1)
    torch.nn.init.normal_(conv.bias, std=0.1)
    assert projection_features(conv) == (6, 5)
    x = torch.randn(2, 3, 6)
    y0 = conv(x)
    a = LoRA(conv, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert a.A.shape == (2, 6) and a.B.shape == (5, 2)
    assert torch.equal(conv(x), y0)  # B = 0
    with torch.no_grad():
        a.B.normal_()
    y1 = conv(x)
    assert not torch.allclose(y1, y0, atol=1e-3)
    a.merge()
    assert conv.weight.shape == (6, 5) and not conv._forward_hooks
    assert torch.allclose(conv(x), y1, atol=1e-5)
    with pytest.raises(TypeError, match="LoRA adapts nn.Linear or transformers' Conv1D"):
        projection_features(torch.nn.Embedding(3, 4))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_eval_and_learn(arch: str, hf_dirs: dict[str, Path], world: dict, tmp_path: Path) -> None:
    """eval --method lora and learn method=lora on a retrofitted Llama and GPT-2: eval leaves
    the model directory as it was; learn writes a checkpoint that loads, in which only the
    adapted projections' weights changed (memory values and the rest of the base as they were)."""
    from safetensors.torch import load_file

    from knowedit.baselines import lora_targets

    model = tmp_path / "rf"
    retrofit(hf_dirs[arch], model, layers="0,1", slots=256, overrides=MEMORY)
    targets = lora_targets(load_checkpoint(model).model)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj") if arch == "llama" else ("attn.c_attn", "attn.c_proj")
    mlp_out = "mlp.down_proj" if arch == "llama" else "mlp.c_proj"
    assert all(any(k.endswith(f"{i}.{'self_attn.' if arch == 'llama' else ''}{a}") for k in targets) for i in (0, 1) for a in attn)
    assert sum(k.endswith(mlp_out) for k in targets) == 2
    assert sorted(k for k in targets if k.startswith("memories.")) == ["memories.0.out", "memories.1.out"]
    before = _tree(model)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "-m", str(model), "--edits", str(world["dir"] / "edits.jsonl"), "--n", "3",
                            "--method", "lora", "--option", "max_steps=10", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["method"] == "lora" and res["T"] == 3
    assert all(0.0 <= res["reliability"][mode] <= 1.0 for mode in ("teacher_forced", "greedy"))
    assert res["params_touched"]["median"] > 0  # the merged adapters changed the live (in-memory) model
    assert _tree(model) == before
    data = tmp_path / "new.jsonl"
    write_jsonl(data, [asdict(e) for e in world["examples"][:4]])
    out = tmp_path / "lora"
    r = runner.invoke(app, ["learn", "-m", str(model), "--data", str(data), "method=lora", "lr=0.01", "epochs=1",
                            "batch_size=2", "--out", str(out), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert _tree(model) == before
    load_checkpoint(out)  # the base fingerprint in config.yaml is the trained base's
    old, new = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(old) == sorted(new)
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {f"{k}.weight" for k in targets}
    assert all(old[k].shape == new[k].shape for k in old)
    values = [k for k in old if k.endswith("pool.values") or k.startswith("pools.")]  # saved under either name
    assert values and not set(values) & changed


def test_memory_outside_last_block(pretrained: Path, world: dict, tmp_path: Path) -> None:
    """Memory in block 0 only: the fast last-layer path is unavailable; the default edits through
    the whole-model path (recorded as layers='all'), `edit apply` and `edit revert` work unchanged,
    and asking for layers='last' explicitly is refused."""
    from knowedit.editor import EditError, Editor
    from knowedit.recipes.retrofit import load_memory_train_config, train_memory

    retrofit(pretrained, tmp_path / "rf", layers="0", slots=256, overrides=MEMORY)
    cfg = load_memory_train_config(None, ["max_epochs=3", "logger=none", "checkpoint_every_n_epochs=0"])
    cfg.out = str(tmp_path / "mem")
    train_memory(tmp_path / "rf", world["dir"] / "corpus.jsonl", cfg, progress=False)
    req = load_records(world["dir"] / "edits.jsonl")[0]
    with Editor.open(tmp_path / "mem") as ed:
        assert ed.model.final_memory() is None
        with pytest.raises(EditError, match="layers='all'"):
            ed.edit(req.prompt, req.target_new, subject=req.subject, layers="last")
        rec = ed.edit(req.prompt, req.target_new, subject=req.subject, allow_failed=True)
        assert rec.metrics["slots_touched"] > 0 and rec.metrics["prob_after"] > rec.metrics["prob_before"]
        ed.revert(rec.id)
    runner = CliRunner()
    before = (tmp_path / "mem" / "model.safetensors").read_bytes()
    r = runner.invoke(app, ["edit", "apply", "-m", str(tmp_path / "mem"), "-p", req.prompt, "-t", req.target_new,
                            "-s", req.subject, "--allow-failed", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    eid = out["applied"][0]["id"] if "applied" in out else out["id"]
    r = runner.invoke(app, ["ledger", "show", eid, "-m", str(tmp_path / "mem"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["settings"]["layers"] == "all", r.output
    r = runner.invoke(app, ["edit", "revert", eid, "-m", str(tmp_path / "mem")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ledger", "verify", "-m", str(tmp_path / "mem")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mem" / "model.safetensors").read_bytes() == before


def test_mismatched_base_is_refused(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    import knowedit

    knowedit.retrofit(hf_dirs["llama"], tmp_path / "a", slots=256, overrides=MEMORY)  # the package-level call
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    name = next(k for k in tensors if k.startswith("hf.model.layers.0.mlp"))
    tensors[name] = tensors[name] + 1e-3  # another base under the same memory
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="base weights do not match"):
        load_checkpoint(tmp_path / "a")
    r = CliRunner().invoke(app, ["ask", "Hello", "-m", str(tmp_path / "a")])
    _one_line_failure(r, "base weights do not match")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before  # nothing written


def test_bad_input_is_one_line_and_writes_nothing(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    runner = CliRunner()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    notok = tmp_path / "notok"
    shutil.copytree(hf_dirs["gpt2"], notok)
    (notok / "tokenizer.json").unlink()
    cases = [
        ([str(tmp_path / "missing")], [], "is not a directory"),
        ([str(tmp_path)], [], "no config.json"),
        ([str(bert)], [], "not a causal language model"),
        ([str(neox)], [], "unsupported architecture 'gpt_neox' (supported: gpt2, llama, mistral, qwen2)"),
        ([str(notok)], [], "no tokenizer.json"),
        ([str(hf_dirs["gpt2"])], ["--layers", "5"], "layer 5 is out of range: the model has 2 blocks"),
        ([str(hf_dirs["gpt2"])], ["--slots", "1000"], "perfect square"),
        ([str(hf_dirs["gpt2"])], ["memory.nope=1"], "nope"),
    ]
    for src, extra, phrase in cases:
        out = tmp_path / "out"
        r = runner.invoke(app, ["retrofit", "--from", src[0], "--out", str(out), *extra])
        _one_line_failure(r, phrase)
        assert not out.exists(), phrase
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # An existing output directory is refused and left as it was.
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep").write_text("x")
    _one_line_failure(runner.invoke(app, ["retrofit", "--from", str(hf_dirs["gpt2"]), "--out", str(out)]), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_resume_and_resume_with_another_base(pretrained: Path, hf_dirs: dict[str, Path], world: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    for name, src in (("a", pretrained), ("b", hf_dirs["llama"])):
        r = runner.invoke(app, ["retrofit", "--from", str(src), "--out", str(tmp_path / name), "--slots", "256", *MEMORY])
        assert r.exit_code == 0, r.output
    data = str(world["dir"] / "corpus.jsonl")
    out = tmp_path / "run"
    r = runner.invoke(app, ["train-memory", str(tmp_path / "a"), "--data", data, "--out", str(out), "max_epochs=1", "logger=none", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "checkpoints" / "last.ckpt").is_file()
    r = runner.invoke(app, ["train-memory", str(tmp_path / "a"), "--data", data, "--out", str(out), "max_epochs=2", "logger=none",
                            "--quiet", "--resume", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["epochs"] == 2
    r = runner.invoke(app, ["train-memory", str(tmp_path / "b"), "--data", data, "--out", str(out), "max_epochs=3", "logger=none",
                            "--quiet", "--resume"])
    _one_line_failure(r, "cannot resume", "model.fingerprint")


def test_no_network_and_no_cache(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The retrofit runs with sockets disabled and writes nothing to a Hugging Face cache."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def _no(*a, **k):\n    raise OSError('network access attempted')\n"
        "socket.socket.connect = _no\nsocket.create_connection = _no\nsocket.getaddrinfo = _no\n"
    )
    cache = tmp_path / "hf-home"
    env = {**os.environ, "PYTHONPATH": f"{guard}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cache), "OMP_NUM_THREADS": "1"}
    code = ("import socket\n"
            "try:\n    socket.create_connection(('example.com', 80))\n    raise SystemExit('the guard is off')\n"
            "except OSError:\n    pass\n"
            "from knowedit.cli.app import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code, "retrofit", "--from", str(hf_dirs["llama"]), "--out", str(tmp_path / "rf"),
                        "--slots", "256", *MEMORY, "--json"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"] == [1]
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))


def test_without_transformers_the_error_names_the_extra(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    code = "import sys\nsys.modules['transformers'] = None\nfrom knowedit.cli.app import main\nmain()\n"
    r = subprocess.run([sys.executable, "-c", code, "retrofit", "--from", str(hf_dirs["gpt2"]), "--out", str(tmp_path / "rf")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    assert "pip install 'knowedit[hf]'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "rf").exists()


def test_checkout_kernels_folder_shadowing_the_hub_package_is_named() -> None:
    """From the checkout's root, `python -c` puts its top-level `kernels/` (knowedit.kernels' source)
    on sys.path ahead of site-packages; the retrofit says so in one line instead of failing inside
    transformers' imports. With `-P` (no script or working folder on sys.path) it imports."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hugging Face `kernels` package is not installed (transformers < 5.25)")
    code = "from knowedit.retrofit import _need_transformers; _need_transformers(); print('ok')"
    shadowed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert shadowed.returncode != 0
    assert "hides the Hugging Face `kernels` package" in shadowed.stderr
    assert "python -P" in shadowed.stderr
    clean = subprocess.run([sys.executable, "-P", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip() == "ok"
