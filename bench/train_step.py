"""Time one training step of a recipe, the way ``knowedit train`` takes it.

Builds the recipe's model and data (recipe YAML + overrides, as ``knowedit train``
reads them), draws batches in the recipe's order, and times forward + backward +
both optimizers' steps, median over ``--steps`` after ``--warmup``. Three ways to
run a step, each in the same process on the same batches:

- ``full-head``: the head over every padded position, then the cross-entropy with
  ``ignore_index`` (how the recipe ran before ``target_logits``);
- ``target-head``: the head only at the positions that have a target;
- ``buckets=N``: that, with each batch run as N parts of like length
  (``data.length_buckets``).

    python bench/train_step.py --recipe counterfact --data PATH/counterfact-train.json \\
        model.d_model=128 model.n_layers=4 model.n_heads=4 'model.memory_layers=[1,3]' \\
        model.memory.n_keys=128 model.memory.topk=8 model.memory.key_dim=64 data.batch_size=64

Also times the per-epoch accuracy check (teacher forcing of 4,000 training
sentences) that the recipe runs after every epoch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="counterfact", help="recipe name (recipes/configs/NAME.yaml)")
    ap.add_argument("--data", default="", help="data.path for recipes that read a file")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per way")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--buckets", default="1,4", help="data.length_buckets values to time (comma-separated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="recipe overrides KEY=VALUE")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from knowedit.config import load_train_config
    from knowedit.inference import teacher_forced
    from knowedit.model import build_model
    from knowedit.recipes.train import FactDataModule, _collate, backward_in_parts, value_optimizer

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "configs" / f"{args.recipe}.yaml"
    overrides = [*([f"data.path={args.data}"] if args.data else []), *args.overrides]
    cfg = load_train_config(str(recipe), overrides)
    dm = FactDataModule(cfg)
    cfg.model.vocab_size = dm.codec.vocab_size
    model = build_model(cfg.model, seed=cfg.seed).train()
    o = cfg.optim
    opts = [torch.optim.AdamW(model.other_parameters(), lr=o.lr, weight_decay=o.weight_decay)]
    if model.value_parameters():
        opts.append(value_optimizer(o, model.value_parameters()))
    order = list(range(len(dm.train_ex)))
    random.Random(cfg.seed).shuffle(order)
    bs = cfg.data.batch_size
    n_batches = args.warmup + args.steps
    n = len(order)  # a corpus smaller than the batches needed is read round again
    batches = [
        _collate(dm.codec, [dm.train_ex[order[(k * bs + j) % n]] for j in range(bs)], max_len=cfg.model.max_seq_len,
                 answer_only=cfg.data.answer_only_loss)
        for k in range(n_batches)
    ]  # fmt: skip

    def step(b, way: str, k: int) -> None:  # noqa: ANN001
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if way == "full-head":
            logits = model(b.ids)
            F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100).backward()
        else:
            backward_in_parts(model, b, k, torch.Tensor.backward)
        for opt in opts:
            opt.step()

    ways = [("full-head", 1)] + [("target-head" if k == 1 else f"buckets={k}", k) for k in map(int, args.buckets.split(","))]
    times: dict[str, list[float]] = {name: [] for name, _ in ways}
    for i, b in enumerate(batches):  # interleaved: every batch runs each way in turn
        for name, k in ways:
            t = time.perf_counter()
            step(b, name, k)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - t) * 1000)
    sample = dm.train_ex if len(dm.train_ex) <= 4000 else random.Random(cfg.seed).sample(dm.train_ex, 4000)
    model.eval()
    t = time.perf_counter()
    teacher_forced(model, dm.codec, sample)
    check_s = time.perf_counter() - t
    lengths = [int((b.targets != -100).sum()) / b.targets.numel() for b in batches]
    out = {
        "recipe": args.recipe,
        "overrides": overrides,
        "batch_size": bs,
        "scored_share_of_padded_positions": round(statistics.mean(lengths), 3),
        "step_ms_median": {name: round(statistics.median(v), 1) for name, v in times.items()},
        "epoch_check_s": round(check_s, 2),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
