"""Start-up time of the ``knowedit`` command: ``--help``, ``version`` and ``ask``, cold.

Each command runs as a fresh process (nothing imported yet; the OS file cache is
warm after the first run, which is not counted), ``--runs`` times; the median
wall time is reported, with whether the process imported torch.

    python bench/startup.py --model runs/tiny --runs 5
    python bench/startup.py --model runs/tiny --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def knowedit_command() -> list[str]:
    """The installed ``knowedit`` script next to this Python, or ``python -m``."""
    script = Path(sys.executable).with_name("knowedit")
    if script.is_file():
        return [str(script)]
    found = shutil.which("knowedit")
    if found:
        return [found]
    return [sys.executable, "-c", "from knowedit.cli.app import main; main()"]


def time_command(argv: list[str], runs: int) -> dict:
    """Median, min and max wall seconds of ``runs`` fresh processes (after one untimed run)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    subprocess.run(argv, capture_output=True, env=env, check=False)  # warm the file cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3)}


def imports_torch(args: list[str]) -> bool:
    """Whether ``knowedit ARGS`` imports torch (run in-process by a probe)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom knowedit.cli.app import app\nsys.argv=['knowedit', *sys.argv[1:]]\n"
         "try:\n    app()\nexcept SystemExit:\n    pass\nsys.stderr.write('\\nTORCH=%d\\n' % ('torch' in sys.modules))", *args],
        capture_output=True, text=True, check=False,
    )
    return "TORCH=1" in proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/tiny", help="checkpoint directory for `ask`")
    ap.add_argument("--prompt", default="The mother tongue of Elos Dunbelan is")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    base = knowedit_command()
    cases = {
        "knowedit --help": ["--help"],
        "knowedit version": ["version"],
        f"knowedit ask --model {a.model}": ["ask", a.prompt, "--model", a.model],
    }
    out = {}
    for name, args in cases.items():
        out[name] = {**time_command([*base, *args], a.runs), "imports_torch": imports_torch(args)}
    meta = {"runs": a.runs, "python": sys.version.split()[0], "cpus": os.cpu_count(), "command": " ".join(base)}
    if a.json:
        print(json.dumps({"meta": meta, "results": out}, indent=2))
        return
    print("| command | median s | min s | max s | imports torch |\n|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {'yes' if r['imports_torch'] else 'no'} |")


if __name__ == "__main__":
    main()
