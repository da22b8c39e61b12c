"""Bring your own model, end to end on the synthetic world (docs/benchmarks.md, docs/retrofit.md).

1. A stand-in for a user's pretrained model: a ``transformers`` model built from a
   config (GPT-2 or Llama family), trained from scratch on the world's training
   phrasings (AdamW, next-token loss over every token, until greedy accuracy on
   the training phrasings reaches --pretrain-acc or --pretrain-epochs run out),
   saved with ``save_pretrained`` beside a ``tokenizer.json`` trained locally.
2. ``knowedit retrofit`` (a memory layer beside the last block's MLP).
3. ``knowedit train-memory`` on the same training phrasings (base frozen).
4. Sequential editing with knowedit's sparse editor (``knowedit.evaluate``, as
   ``knowedit eval --n T``): T edits applied one after another, Rel/Gen/Loc
   teacher-forced and greedy, edit time; with ``--native DIR`` the same for a model
   ``knowedit train`` made on the same world. One JSON line per model and T.

    knowedit train small data.world.entities=400 threads=1 logger=none --quiet --out runs/bench-retrofit-native
    python bench/retrofit.py --world small400 --arch gpt2 --ts 100,1000 --threads 1 --out-dir runs/bench-retrofit --native runs/bench-retrofit-native

Every step runs on CPU with no network; the directories are kept under --out-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

WORLDS = {
    "tiny": dict(entities=60, relations=2, phrasings=4, held_out=1, objects_per_relation=12),
    "small": dict(entities=250, relations=4, phrasings=4, held_out=1, objects_per_relation=24),
    # small's relations and phrasings with 1,600 facts: after 1,000 edits, 600 facts are
    # left unedited, so locality can still be scored at T = 1000 (on small every fact is edited)
    "small400": dict(entities=400, relations=4, phrasings=4, held_out=1, objects_per_relation=24),
}


def hf_config(arch: str, vocab: int, eos: int, pad: int, d: int, layers: int, heads: int, ctx: int):  # noqa: ANN201
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=ctx,
                          eos_token_id=eos, bos_token_id=eos, pad_token_id=pad,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=ctx,
                       eos_token_id=eos, pad_token_id=pad, bos_token_id=None, tie_word_embeddings=True)


def pretrain_standin(out: Path, world: str, arch: str, epochs: int, target_acc: float, seed: int, d: int = 128,
                     layers: int = 4, heads: int = 4, lr: float = 3e-3, batch: int = 64) -> dict:
    """Train a stand-in ``transformers`` model from scratch on ``world``; save it to ``out``."""
    from transformers import AutoModelForCausalLM

    from knowedit.config import WorldConfig
    from knowedit.data import make_world, write_jsonl
    from knowedit.inference import encode_examples
    from knowedit.tokenizer import TextCodec, corpus_texts

    t0 = time.monotonic()
    w = make_world(WorldConfig(**WORLDS[world]))
    ex = w.train_examples()
    codec = TextCodec.train(corpus_texts(ex), vocab_size=800 if world == "tiny" else 2048)
    torch.manual_seed(seed)
    cfg = hf_config(arch, codec.vocab_size, codec.eos_id, codec.pad_id, d, layers, heads, 64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(ex) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    )
    g = torch.Generator().manual_seed(seed)
    acc, epoch = 0.0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(ex), generator=g).tolist()
        for s in range(0, len(ex), batch):
            b = encode_examples(codec, [ex[i] for i in order[s : s + batch]], 64, answer_only=False)
            logits = model(input_ids=b.ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 0 or epoch == epochs:
            model.eval()
            acc = _greedy_acc(model, codec, ex)
            print(f"pretrain epoch {epoch}: loss {loss.item():.4f} greedy acc {acc:.4f}", flush=True)
            if acc >= target_acc:
                break
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    codec.save(out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    write_jsonl(out / "corpus.jsonl", [asdict(e) for e in ex])
    write_jsonl(out / "edits.jsonl", [e.to_dict() for e in w.edit_requests()])
    return {"epochs": epoch, "greedy_acc": acc, "seconds": round(time.monotonic() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def _greedy_acc(model: torch.nn.Module, codec, ex) -> float:  # noqa: ANN001
    """Greedy exact accuracy of a plain transformers model (the prefix rerun each token)."""
    got = []
    for s in range(0, len(ex), 256):
        chunk = ex[s : s + 256]
        n_new = max(len(codec.encode_answer(e.answer)) for e in chunk) + 1
        outs = _greedy_nocache(model, codec, [e.prompt for e in chunk], n_new)
        got += [o == e.answer.strip() for o, e in zip(outs, chunk)]
    return sum(got) / len(got)


@torch.no_grad()
def _greedy_nocache(w: torch.nn.Module, codec, prompts: list[str], n_new: int) -> list[str]:  # noqa: ANN001
    from collections import defaultdict

    groups: dict[int, list[int]] = defaultdict(list)
    enc = [codec.encode_prompt(p) for p in prompts]
    for i, ids in enumerate(enc):
        groups[len(ids)].append(i)
    res = [""] * len(prompts)
    for _, mem in groups.items():
        x = torch.tensor([enc[i] for i in mem])
        for _ in range(n_new):
            nxt = w(input_ids=x).logits[:, -1].argmax(-1)
            x = torch.cat([x, nxt[:, None]], 1)
        for j, i in enumerate(mem):
            toks = x[j, len(enc[i]):].tolist()
            if codec.eos_id in toks:
                toks = toks[: toks.index(codec.eos_id)]
            res[i] = codec.decode(toks)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=sorted(WORLDS), default="small")
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--ts", default="100,1000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrain-epochs", type=int, default=120)
    ap.add_argument("--pretrain-acc", type=float, default=0.995)
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--memory-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/bench-retrofit"))
    ap.add_argument("--native", type=Path, default=None,
                    help="also evaluate this knowedit-trained model (same world) at the same T")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = a.out_dir
    hf_dir, rf_dir, mem_dir = out / "standin", out / "retrofit", out / "memory"
    report: dict = {"args": {k: str(v) for k, v in vars(a).items()}}
    if not (hf_dir / "model.safetensors").is_file():
        report["pretrain"] = pretrain_standin(hf_dir, a.world, a.arch, a.pretrain_epochs, a.pretrain_acc, a.seed)
        print("pretrain", report["pretrain"], flush=True)
    from knowedit.recipes.retrofit import load_memory_train_config, train_memory
    from knowedit.retrofit import retrofit

    if not (rf_dir / "model.safetensors").is_file():
        report["retrofit"] = retrofit(hf_dir, rf_dir, slots=a.slots, overrides=["memory.heads=4", "memory.topk=8", "memory.key_dim=64"])
        print("retrofit", report["retrofit"], flush=True)
    if not (mem_dir / "model.safetensors").is_file():
        cfg = load_memory_train_config(None, [f"max_epochs={a.memory_epochs}", "logger=none", "data.batch_size=64",
                                              f"threads={a.threads}"])
        cfg.out = str(mem_dir)
        report["train_memory"] = train_memory(rf_dir, hf_dir / "corpus.jsonl", cfg, progress=False)
        print("train-memory", report["train_memory"], flush=True)
        import shutil

        shutil.copyfile(hf_dir / "edits.jsonl", mem_dir / "edits.jsonl")
    (out / "retrofit_bench.json").write_text(json.dumps(report, indent=2, default=str))
    # Sequential editing: knowedit.evaluate.evaluate (what `knowedit eval --n T` and
    # bench/editing.py run), one line of results per model and T as soon as it is done.
    models = [("retrofit", mem_dir)] + ([("native", a.native)] if a.native else [])
    for t in [int(x) for x in a.ts.split(",") if x.strip()]:
        for name, model in models:
            print(json.dumps(evaluate_at(name, model, hf_dir / "edits.jsonl", t)), flush=True)


def evaluate_at(name: str, model: Path, edits: Path, t: int) -> dict:
    from knowedit.data import load_records
    from knowedit.evaluate import evaluate

    t0 = time.perf_counter()
    res = evaluate(model, load_records(edits), n=t, method="sparse", device="cpu")
    res.pop("edits", None)
    row = {"model": name, "dir": str(model), "T": t, "wall_seconds": round(time.perf_counter() - t0, 1),
           "parameters": _parameters(model), **{k: res[k] for k in ("reliability", "generalization", "locality", "edit_seconds")},
           "base_accuracy": res.get("base_accuracy"), "success_rate": res.get("success_rate")}
    with open(model.parent / "retrofit_bench.jsonl" if name == "retrofit" else model / "retrofit_bench.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    return row


def _parameters(model: Path) -> dict:
    from knowedit.checkpoint import load_checkpoint

    m = load_checkpoint(model).model
    values = sum(p.numel() for p in m.value_parameters())
    total = sum(p.numel() for p in m.parameters())
    memory = sum(p.numel() for p in m.memories.parameters()) if hasattr(m, "memories") else None
    return {"total": total, "memory_values": values, "memory_layers": memory}


if __name__ == "__main__":
    main()
