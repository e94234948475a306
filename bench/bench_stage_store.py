"""Stage trainings and wall time of two sweeps with the stage store and without it, one after the other.

    python bench/bench_stage_store.py --out /tmp/stage_store_bench [--studies orders,mitigations] [-- overrides...]

Each sweep runs with the basic launcher (its jobs one after the other in one process, as `python -m seqdpo -m`
does by default), W&B off, in its own sweep directory with its own fresh reference cache and stage store, so
both variants compute the same base-reference log-probs. A stage training is a stage row of a job's matrix.json
whose "stage_store" source is "trained" (merge's merged row trains nothing and is not counted). Prints one
JSON object: per study and variant the jobs, stage trainings, wall seconds and the load average before and
after, and the CPU seconds of the sweep's processes (less at the mercy of other load than wall time); and
the ratios with / without. Overrides after `--` go to every job (e.g. shorter stages on a loaded
machine: `-- train.max_steps=4 dataset.n_eval=16`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The mitigations experiment's world, for the order study too (conf/experiment/mitigations.yaml)
WORLD = ["lr=5e-3", "dataset.objectives=[polite,factual]", "dataset.n_train=128", "dataset.n_eval=64",
         "dataset.options.relation=conflicting", "dataset.options.strength=0.5", "dataset.options.markers=1",
         "dataset.options.slot=4"]
STUDIES = {
    "mitigations": ["experiment=mitigations", "seed=0"],  # 2 worlds x 5 strategies, 1 seed
    "orders": ["order=a,ab,aba", "seed=0", *WORLD],
}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes: less at the mercy of other load than wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _sweep(out: Path, study: str, store: bool, extra: list[str]) -> dict:
    sweep = out / f"{study}-{'store' if store else 'nostore'}"
    cmd = [sys.executable, "-m", "seqdpo", "-m", *STUDIES[study], *extra, "logger=none", f"hydra.sweep.dir={sweep}",
           f"ref_cache_dir={sweep / 'refcache'}", f"stage_store_dir={sweep / 'store'}", f"stage_store={store}"]
    load = os.getloadavg()[0]
    t0, cpu0 = time.time(), _children_cpu()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.time() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    sources = [row["source"] for m in sweep.glob("*/matrix.json")
               for row in json.loads(m.read_text())["stage_store"]["stages"]]
    return {"jobs": len(list(sweep.glob("*/matrix.json"))), "stage_trainings": sources.count("trained"),
            "from_store": sources.count("store"), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "summary": proc.stdout.strip().splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--studies", default="orders,mitigations")
    ap.add_argument("--store-first", action="store_true", help="run the sweep with the store before the one without")
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every job")
    args = ap.parse_args()
    result = {"overrides": args.overrides}
    for study in args.studies.split(","):
        if args.store_first:
            with_store, without = (_sweep(args.out, study, v, args.overrides) for v in (True, False))
        else:
            without, with_store = (_sweep(args.out, study, v, args.overrides) for v in (False, True))
        result[study] = {"without": without, "with": with_store,
                         "ratio_trainings": round(with_store["stage_trainings"] / without["stage_trainings"], 3),
                         "ratio_wall": round(with_store["wall_s"] / without["wall_s"], 3),
                         "ratio_cpu": round(with_store["cpu_s"] / without["cpu_s"], 3)}
        print(json.dumps({study: result[study]}), flush=True)
    (args.out / "stage_store_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
