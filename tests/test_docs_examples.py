"""Docs that run: every command and Python block of README.md and docs/*.md.

Each fenced block is parsed out of the markdown (nothing is copied here):

- ```bash / ```sh / ```shell blocks (```console: their ``$ `` lines) and
  ```python blocks run, in the order they appear, as one bash script per doc
  file in a fresh working directory (``HOME`` there too), so a block that
  trains ``runs/demo`` is followed by one that edits it, and ``export``s and
  shell variables carry over; every command must exit 0 (``set -e``);
- ```text / ```json / ```yaml ... blocks are output or data and are not run;
- a block without a language, or with one not listed here, fails the test: give
  it one (``text`` for output), so no command goes unrun by accident;
- a benchmark, training or evaluation command written inline (`...`) in prose
  fails :func:`test_commands_are_in_blocks`: it goes in a ```bash block.

Heavy commands (hour-long trainings, benchmarks at T = 1000) run too, rewritten
by :data:`SUBSTITUTIONS`, the visible table below: every rewrite names its
reason, must still match some block (a stale one fails
:func:`test_every_substitution_is_used`), and the script the test ran is
printed on failure. Commands that are not run at all (README's setup, the test
suite itself, the GPU benchmark) are rewritten to ``: not run`` by the same
table, with the reason beside them; :func:`test_readme_setup_lines` checks
README's setup lines instead.

Model directories a file's blocks use but no earlier block of that file makes
(``--model runs/small`` in docs/editing.md) are copies of the session's tiny
model (``tiny_ckpt`` in conftest.py), and so is ``knowedit train tiny --out D``
(the same command's output). ``knowedit demo``, the other ``knowedit train``
commands and the benchmark scripts train for real, on small recipes or on the
hand-made CounterFact file :data:`COUNTERFACT_RECORDS` (nothing here reads
the real CounterFact data, which lives outside the project).

The doc files run side by side on ``DOCS_TEST_JOBS`` workers (default 2), each
script one torch thread. The numbers in the docs' tables are not compared
(they came from hour-long runs on a given machine); the commands that print
them must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
#: Output, data and schema blocks: shown, not run.
NOT_CODE_LANGS = {"text", "json", "jsonl", "yaml", "toml", "output"}

#: Seconds one doc file's blocks may take in all (a heavy command the table does
#: not shrink fails here instead of hanging CI). docs/benchmarks.md, the longest,
#: took 15 min on 2 cores shared with other jobs (load 5-9).
FILE_TIMEOUT_S = 1800

#: ``(pattern, replacement, reason)``: regex rewrites of the blocks' text, in
#: order (``re.MULTILINE``). Every one must match at least one block.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    # README's first two lines: the fresh-machine setup.
    (
        r"^python3 -m venv \.venv && \.venv/bin/pip install -q torch==[0-9.]+ && "
        r"\.venv/bin/pip install -q -e '\.\[dev\]' && ",
        "",
        "README setup: the venv and its installs exist already (test_readme_setup_lines "
        "checks the pins and extras against the installed environment)",
    ),
    (
        r"^\.venv/bin/ruff check \. && TRITON_INTERPRET=1 \.venv/bin/python -P -m pytest -q$",
        ": not run: the linter and the whole test suite",
        "README line 3 is what CI runs (.ci/run), this test included: running it here "
        "would recurse",
    ),
    (
        r"^pip install -e '\.\[serve\]'.*$",
        'python -c "import fastapi, uvicorn"',
        "an install into the environment: checks that the extras it installs import",
    ),
    (
        r"^(?:\w+=\S+ )*(?:\S*/)?(?:python -m )?pytest\b.*$",
        ": not run: a test-suite command",
        "tests run in the suite itself (CI runs README line 3): not twice from here",
    ),
    (r"^OUT=\S+ bash bench/gpu_check\.sh$", ": not run: needs a GPU",
     "the GPU session script runs the compiled kernel tests and the GPU benchmark"),
    (r"^python bench/lookup_kernels\.py --json-out.*$", ": not run: needs a GPU",
     "the GPU benchmark times CUDA events; the next line of docs/kernels.md runs the same "
     "script's CPU smoke shapes"),
    # Trainings: the tiny recipe, or the counterfact recipe on a hand-made file.
    (r"knowedit demo(?![^\n]*--recipe)", "knowedit demo --recipe tiny",
     "the demo's `small` recipe takes ~1.5 min; `tiny` takes seconds"),
    (r"knowedit train small\b", "knowedit train tiny",
     "`small` takes ~1.5 min on 2 cores; `tiny` seconds"),
    (r"knowedit train large\b", "knowedit train tiny",
     "`large` trains for 90 minutes on one core; `tiny` seconds"),
    (r"^knowedit train tiny --out (runs/[\w.-]+)(?: -q| --json| threads=1)*(?: +#.*)?$",
     r'mkdir -p "$(dirname \1)" && cp -r "$DOCS_TINY_MODEL" \1',
     "the session's tiny model (conftest's tiny_ckpt) is this command's output: copied, not "
     "trained again (`knowedit demo` and the counterfact recipe still train here)"),
    (r"\bmax_minutes=\d+", "max_minutes=1", "hour-long trainings: stop after a minute at most"),
    (r"\bmax_epochs=[1-9]\d+(?![^\n]*--resume)", "max_epochs=2",
     "hour-long trainings (10 epochs or more): two (a --resume keeps its own: it goes on from the run before)"),
    (r"PATH/counterfact-train\.json", "counterfact-train.json",
     "the real CounterFact file is outside the project: the hand-made records"),
    (r"(?<![\w.])/tmp/", "tmp/", "keep every file inside the test's working directory"),
    # Benchmarks: the same scripts and options, at the smallest sizes.
    (r"--ts [0-9,]+", "--ts 1", "T (bench/editing.py) or top_t (bench/continual.py): one value"),
    (r"--n \d+", "--n 1", "edits: one"),
    (r"--background-extra \d+", "--background-extra 24", "bench/edit_scale.py: a few unseen sentences, not 30,000"),
    (r"--option layers=all", "--option layers=all --option max_steps=5",
     "a layers=all edit takes ~20 s on CPU at the default 100 steps: 5 run the same code"),
    (r"--limit \d+", "--limit 8", "CounterFact records: the hand-made file has 8"),
    (r"--epochs \d+", "--epochs 1", "continual learning: one epoch"),
    (r"--every \d+", "--every 20", "continual learning: fewer evaluations"),
    (r"--asks \d+ --edits \d+ --cli-asks \d+ --cli-edits \d+",
     "--asks 2 --edits 1 --cli-asks 1 --cli-edits 1", "bench/serve.py: one or two of each"),
    (r"--steps \d+ --kills \d+", "--steps 3 --kills 1 --only random,sigkill",
     "bench/ledger_battery.py: 3 steps, 1 kill; its tamper battery runs in the next "
     "command of docs/benchmarks.md (`--only tamper`), not twice"),
    (r"bench/ledger_battery\.py", 'bench/ledger_battery.py --model "$DOCS_TINY_MODEL"',
     "without --model the script trains the tiny recipe itself: the session's tiny model "
     "(it works on a copy)"),
    (r"--wait-idle \d+", "--wait-idle 0", "bench/memory_scaling.py: do not wait for an idle machine"),
    (r"--retry-busy \d+", "--retry-busy 0", "bench/memory_scaling.py: no reruns"),
    (r"bench/memory_scaling\.py", "bench/memory_scaling.py --sizes 8 --quick --batch 1 --seq 16 --dim 32",
     "2^20 rows take 8 GiB: 2^8 rows, tiny shapes, fewer repeats"),
    (r"--runs \d+", "--runs 1", "bench/startup.py: one timed run of each command"),
    (r"bench/train_step\.py", "bench/train_step.py --steps 2 --warmup 1", "bench/train_step.py: two timed steps"),
    (r"(bench/continual\.py (?![^\n]*--train-set)[^\n]*)$", r"\1 --train-set max_epochs=1",
     "bench/continual.py pretrains on A for minutes: one epoch (its default 65,536 slots "
     "per pool go with it)"),
    (r"(bench/continual\.py (?![^\n]*--set )[^\n]*)$", r"\1 --set max_steps=2",
     "bench/continual.py: two learning steps per method (its curves then have two points)"),
    (r"--set guard_docs=", "--set max_steps=2 guard_docs=",
     "bench/continual.py with guard documents (its other --set runs): two learning steps per method"),
    (r"--train-set model\.memory\.n_keys=\d+", "--train-set max_epochs=1",
     "bench/continual.py pretrains on A for minutes: one epoch at the recipe's slots"),
    (r"^knowedit [^\n]*(?:~/models/Qwen2\.5-0\.5B|runs/qwen-mem)[^\n]*$",
     ": not run: needs a local Qwen2.5-0.5B checkpoint and a GPU",
     "docs/retrofit.md's real-checkpoint commands: no weights can be downloaded here (the "
     "page's tiny-model example runs the same commands)"),
    (r"bench/retrofit\.py --world small400", "bench/retrofit.py --world tiny --pretrain-epochs 5 --memory-epochs 1",
     "bench/retrofit.py pretrains a GPT-2 stand-in on 1,600 facts for minutes: the tiny world, "
     "5 epochs, one epoch of memory training"),
    (r"^knowedit train tiny data\.world\.entities=400 [^\n]*--out (runs/[\w.-]+)$",
     r'mkdir -p "$(dirname \1)" && cp -r "$DOCS_TINY_MODEL" \1',
     "docs/benchmarks.md's native model for bench/retrofit.py: the session's tiny model, on "
     "the tiny world the rewritten bench/retrofit.py command uses"),
    (r"^[^\n]*\btrainer\.devices=8\b[^\n]*$", ": not run: needs 8 GPUs a node, and two nodes for num_nodes=2",
     "docs/distributed.md's multi-GPU and multi-node commands: this machine has no GPU (the "
     "page's CPU commands run the same code on gloo processes)"),
    (r"bench/distributed\.py --parity --worlds 2 4", "bench/distributed.py --parity --worlds 2 --set max_steps=4",
     "bench/distributed.py --parity: two batches on 1 and 2 processes, not twenty on 1, 2 and 4"),
    (r"bench/distributed\.py(?! --parity)(?: --json-out \S+)?", "bench/distributed.py --n-keys 64 --steps 1 --warmup 0",
     "bench/distributed.py: 2^20 slots in 7 processes take minutes; 2^12 slots, one timed step"),
    # The HTTP server: in the background on a free port, curl failing on HTTP errors.
    (r"^knowedit serve (.*)$", r"knowedit serve \1 --port $DOCS_PORT & wait_for_server",
     "the server runs until killed: in the background, the script waits for /health "
     "and kills it at the end"),
    (r"localhost:8000", "localhost:$DOCS_PORT", "a free port"),
    (r"\bcurl -s\b", "curl -sSf", "an HTTP error fails the block"),
]

#: Shell prepended to each file's script.
PREAMBLE = r"""
set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
wait_for_server() {
  for _ in $(seq 240); do
    curl -sf "localhost:$DOCS_PORT/health" | grep -q '"ready": *true' && return 0
    sleep 0.5
  done
  echo "server did not become ready" >&2; return 1
}
"""

#: A CounterFact-like file in EasyEdit's format (fields as in
#: knowedit/data/records.py), standing in for CounterFact's counterfact-train.json.
COUNTERFACT_RECORDS = [
    {
        "case_id": i,
        "prompt": f"The mother tongue of {s} is",
        "subject": s,
        "target_new": new,
        "ground_truth": true,
        "rephrase_prompt": f"{s} grew up speaking",
        "locality_prompt": [f"The mother tongue of {o} is"],
        "locality_ground_truth": [o_true],
    }
    for i, (s, true, new, o, o_true) in enumerate(
        [
            ("Danielle Darrieux", "French", "English", "Lionel Jospin", "French"),
            ("Edwin of Northumbria", "English", "Dutch", "Richard Burton", "English"),
            ("Thomas Joannes Stieltjes", "Dutch", "English", "Anton Philips", "Dutch"),
            ("Go Hyeon-jeong", "Korean", "French", "Park Ji-sung", "Korean"),
            ("Sylvano Bussotti", "Italian", "French", "Dario Fo", "Italian"),
            ("Frederic Mistral", "French", "English", "Jean Renoir", "French"),
            ("Pieter Zeeman", "Dutch", "French", "Hendrik Lorentz", "Dutch"),
            ("Chang Chen", "Chinese", "Japanese", "Jay Chou", "Chinese"),
        ]
    )
]


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (1-based line of the fence), its language, its text."""

    path: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a markdown file (CommonMark fences), in order."""
    blocks, open_fence, start, lang, body = [], None, 0, "", []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line)
        if open_fence is None:
            if m:
                open_fence, start, lang, body = m.group(1), i, m.group(2).lower(), []
        elif m and m.group(1)[0] == open_fence[0] and len(m.group(1)) >= len(open_fence) \
                and not line.strip().strip(open_fence[0]):
            blocks.append(Block(path, start, lang, "\n".join(body) + "\n"))
            open_fence = None
        else:
            body.append(line)
    assert open_fence is None, f"{path.relative_to(REPO)}:{start}: unclosed code fence"
    return blocks


def substitute(text: str, used: set[int] | None = None) -> str:
    """``text`` with :data:`SUBSTITUTIONS` applied (indices of those that matched go in ``used``)."""
    for k, (pattern, repl, _why) in enumerate(SUBSTITUTIONS):
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        if n and used is not None:
            used.add(k)
    return text


def console_commands(text: str) -> str:
    """The commands of a ``console`` block: its ``$ `` lines (the rest is output)."""
    return "".join(line[2:] + "\n" for line in text.splitlines() if line.startswith("$ "))


def script_for(doc: Path, workdir: Path) -> tuple[str, list[Block]]:
    """The bash script that runs a doc file's blocks in order, and the blocks it runs.

    Fails on a block of unknown language. Python blocks are written to files
    next to the script and run by the venv's interpreter.
    """
    parts, ran = [PREAMBLE], []
    for b in fenced_blocks(doc):
        if b.lang in NOT_CODE_LANGS:
            continue
        if b.lang not in SHELL_LANGS | PYTHON_LANGS:
            pytest.fail(
                f"{b.where}: a ```{b.lang or '(no language)'} block: this test does not know how "
                "to run it. Tag commands ```bash and code ```python (they run here), output or "
                f"data with one of {sorted(NOT_CODE_LANGS)}."
            )
        ran.append(b)
        parts.append(f"echo \">>> block {b.where} (at ${{SECONDS}} s)\" >&2")
        if b.lang in PYTHON_LANGS:
            src = workdir.parent / f"block_{b.line}.py"
            src.write_text(substitute(b.text))
            parts.append(f"python {src}")
        else:
            text = console_commands(b.text) if b.lang == "console" else b.text
            parts.append(substitute(text))
    parts.append('echo ">>> done (at ${SECONDS} s)" >&2')
    return "\n".join(parts), ran


_MODEL_REF = re.compile(r"""(?:--model[ =]|Editor\.open\(|learn\()["']?(runs/[\w.-]+)""")
_MODEL_MADE = re.compile(r"--out[ =](runs/[\w.-]+)|knowedit demo(?![^\n]*--out)")


def models_to_provide(blocks: list[Block]) -> list[str]:
    """Model directories the blocks read before any block of the file makes them."""
    made, needed = set(), []
    for b in blocks:
        for line in b.text.splitlines():  # as written: a substitution may replace a training by a copy
            for m in _MODEL_MADE.finditer(line):
                made.add(m.group(1) or "runs/demo")
            for m in _MODEL_REF.finditer(line):
                name = m.group(1)
                if name not in made and name not in needed:
                    needed.append(name)
    return needed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_setup_lines() -> None:
    """README lines 2 and 3 (the setup command and CI's test command) are not run
    here; check what they say instead: the torch pin is the installed torch, the
    extra exists, line 3 is the test command that .ci/run runs."""
    import torch

    lines = (REPO / "README.md").read_text().splitlines()
    setup, check = lines[1], lines[2]
    pin = re.search(r"torch==([0-9.]+)", setup)
    assert pin and torch.__version__.split("+")[0] == pin.group(1), (setup, torch.__version__)
    assert setup.endswith("knowedit demo"), setup
    assert check.startswith(setup.removesuffix(".venv/bin/knowedit demo")), (setup, check)
    assert check.endswith(".venv/bin/python -P -m pytest -q") and "ruff check ." in check, check
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in re.findall(r"'\.\[(\w+)\]'", setup + check):
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra
    assert "sed -n 3p README.md" in (REPO / ".ci" / "run").read_text()


#: Inline code that reads as a whole command of these kinds (the ones that make a
#: doc's numbers) must be in a fenced block instead, where this test runs it.
_INLINE_COMMAND = re.compile(
    r"`(?:\w+=\S+ )*((?:\.venv/bin/)?python (?:bench/|-c )[^`]*|knowedit (?:train|eval|stats) [^`]*--(?:out|model) [a-z.][^`]*)`"
)


def test_commands_are_in_blocks() -> None:
    """A benchmark, training or evaluation command written inline (`...`) would
    never be run: it belongs in a ```bash block."""
    inline = []
    for doc in DOCS:
        fenced = {i for b in fenced_blocks(doc) for i in range(b.line, b.line + b.text.count("\n") + 2)}
        prose = "\n".join(
            line for i, line in enumerate(doc.read_text().splitlines(), 1)
            if i not in fenced and not line.startswith("#")
        )
        inline += [f"{doc.relative_to(REPO)}: {m.group(1)}" for m in _INLINE_COMMAND.finditer(prose)]
    assert not inline, "commands outside a ```bash block:\n" + "\n".join(inline)


def test_every_block_is_known() -> None:
    """Every fenced block has a language this test runs or knows to be output."""
    unknown = [
        f"{b.where}: ```{b.lang or '(none)'}"
        for doc in DOCS
        for b in fenced_blocks(doc)
        if b.lang not in SHELL_LANGS | PYTHON_LANGS | NOT_CODE_LANGS
    ]
    assert not unknown, "blocks this test cannot classify (tag them): " + ", ".join(unknown)


def test_every_substitution_is_used() -> None:
    """A rewrite that matches no block is stale: remove it (or the docs lost a command)."""
    used: set[int] = set()
    for doc in DOCS:
        for b in fenced_blocks(doc):
            if b.lang in SHELL_LANGS | PYTHON_LANGS:
                substitute(b.text, used)
    stale = [SUBSTITUTIONS[k][0] for k in range(len(SUBSTITUTIONS)) if k not in used]
    assert not stale, f"substitutions that match no block: {stale}"


@dataclass
class DocRun:
    """What running one doc file's blocks gave."""

    script: str
    blocks: list[Block]
    returncode: int | None  # None: over FILE_TIMEOUT_S
    stdout: str
    stderr: str


def run_doc(doc: Path, tiny_ckpt: Path, tmp: Path) -> DocRun:
    """Run a doc file's blocks as one script in a fresh directory under ``tmp``."""
    work = tmp / "work"
    (tmp / "home").mkdir()
    work.mkdir()
    for name in ("bench", ".venv"):  # `python bench/x.py`, `.venv/bin/knowedit`
        (work / name).symlink_to(REPO / name)
    (work / "counterfact-train.json").write_text(json.dumps(COUNTERFACT_RECORDS, indent=1))
    script, blocks = script_for(doc, work)
    if not blocks:
        return DocRun(script, blocks, 0, "", "")
    for name in models_to_provide(blocks):
        shutil.copytree(tiny_ckpt, work / name)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KNOWEDIT_")},
        "HOME": str(tmp / "home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
        "PYTHONUNBUFFERED": "1",
        "PIP_NO_INDEX": "1",
        "DOCS_PORT": str(free_port()),
        "DOCS_TINY_MODEL": str(tiny_ckpt),
    }
    try:
        proc = subprocess.run(
            ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
            timeout=FILE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        out = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        return DocRun(script, blocks, None, *out)
    return DocRun(script, blocks, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def doc_runs(
    request: pytest.FixtureRequest, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[DocRun]]]:
    """The selected doc files' runs, started together on ``DOCS_TEST_JOBS`` workers
    (default 2: the scripts are independent, each one thread); the most commands first."""
    selected = [
        item.callspec.params["doc"] for item in request.session.items
        if getattr(item, "originalname", None) == "test_doc_blocks_run"
    ]
    selected.sort(key=lambda d: sum(b.text.count("\n") for b in fenced_blocks(d)), reverse=True)
    pool = ThreadPoolExecutor(max_workers=int(os.environ.get("DOCS_TEST_JOBS", "2")))
    futures = {d: pool.submit(run_doc, d, tiny_ckpt, tmp_path_factory.mktemp(d.stem)) for d in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_blocks_run(doc: Path, doc_runs: dict[Path, Future[DocRun]]) -> None:
    """A doc file's shell and Python blocks, run in order: every one exits 0."""
    run = doc_runs[doc].result()
    name = str(doc.relative_to(REPO))
    if not run.blocks:
        pytest.skip(f"{name} has no command or Python block")
    print("\n".join(line for line in run.stderr.splitlines() if line.startswith(">>> ")))
    if run.returncode != 0:
        started = re.findall(r">>> block (\S+)", run.stderr)
        where = started[-1] if started else name
        why = f"ran over {FILE_TIMEOUT_S} s" if run.returncode is None else f"exited {run.returncode}"
        pytest.fail(
            f"{name}: the block at {where} {why}\n--- script ---\n{run.script}\n"
            f"--- stdout (tail) ---\n{run.stdout[-3000:]}\n--- stderr (tail) ---\n{run.stderr[-5000:]}"
        )
