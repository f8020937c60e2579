"""Cost of ``import celery_cloudtasks`` next to importing Celery, in fresh interpreters.

Each contender runs in a new subprocess, interleaved over ``--rounds`` rounds;
the subprocess times its own import statement with ``perf_counter`` (so
interpreter start-up is excluded) and reports whether any heavy optional
dependency (google-cloud-tasks, grpc, google-auth, Flask, prometheus_client)
got imported. The wall time of the whole subprocess is printed too.

Contenders:

* ``import celery``: the bare package, which is lazy (nothing is loaded yet);
* ``from celery import Celery``: what every Celery application imports;
* ``import celery_cloudtasks``: the library alone (it imports kombu's transport
  registry, the part of Celery's stack it needs);
* ``Celery + celery_cloudtasks``: both, i.e. what adding the library costs an app.

Target: ``import celery_cloudtasks`` <= 1.2x ``from celery import Celery``.

    .venvs/dev/bin/python bench/import_cost.py [--rounds 21]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import ROOT, median, print_table

HEAVY = ("google.cloud.tasks", "google.auth", "grpc", "flask", "prometheus_client")

CONTENDERS = {
    "import celery": "import celery",
    "from celery import Celery": "from celery import Celery",
    "import celery_cloudtasks": "import celery_cloudtasks",
    "Celery + celery_cloudtasks": "from celery import Celery; import celery_cloudtasks",
}

PROBE = """
import json, sys, time
started = time.perf_counter()
{statement}
seconds = time.perf_counter() - started
heavy = [p for p in {heavy!r} if any(m == p or m.startswith(p + ".") for m in sys.modules)]
print(json.dumps({{"seconds": seconds, "heavy": heavy, "modules": len(sys.modules)}}))
"""


def run_one(statement: str) -> tuple[float, float, dict[str, object]]:
    code = PROBE.format(statement=statement, heavy=HEAVY)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    wall = time.perf_counter() - started
    data = json.loads(out.strip().splitlines()[-1])
    return float(data["seconds"]), wall, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()

    imports: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    walls: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    info: dict[str, dict[str, object]] = {}
    for statement in CONTENDERS.values():  # warm the bytecode caches
        run_one(statement)
    for _ in range(args.rounds):
        for name, statement in CONTENDERS.items():
            seconds, wall, data = run_one(statement)
            imports[name].append(seconds)
            walls[name].append(wall)
            info[name] = data

    rows = []
    for name in CONTENDERS:
        heavy = info[name]["heavy"] or "none"
        rows.append(
            (
                name,
                f"{median(imports[name]) * 1000:.1f} ms",
                f"process {median(walls[name]) * 1000:.0f} ms; "
                f"{info[name]['modules']} modules; heavy deps loaded: {heavy}",
            )
        )
    ours = median(imports["import celery_cloudtasks"])
    app = median(imports["from celery import Celery"])
    both = median(imports["Celery + celery_cloudtasks"])
    bare = median(imports["import celery"])
    rows += [
        (
            "ratio: celery_cloudtasks / Celery",
            f"{ours / app:.2f}x",
            "import celery_cloudtasks vs from celery import Celery (target <= 1.2x)",
        ),
        (
            "ratio: app with / without us",
            f"{both / app:.2f}x",
            f"adding the library to a Celery app costs {(both - app) * 1000:+.1f} ms",
        ),
        (
            "ratio: vs bare import celery",
            f"{ours / bare:.1f}x",
            "celery's package import is lazy; not a meaningful baseline",
        ),
    ]
    print_table(f"import cost: median of {args.rounds} fresh interpreters each", rows)


if __name__ == "__main__":
    main()
