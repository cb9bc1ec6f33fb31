"""How far the goldens' numbers move between floating-point paths: the spread the tolerances of
``tests/goldens.py`` must cover, and (run with a change planted in the pipeline) the shift they
must catch.

Runs ``mgll demo --quick`` and ``mgll ablate --quick --seeds 1`` once per condition, each in a
fresh process: ``t1`` / ``t2`` (``torch.set_num_threads(1)`` / ``(2)``: other reduction splits
in matmuls and convolutions) and ``nomkldnn`` (2 threads, oneDNN off: other convolution kernels,
as another CPU would take). Prints, per run, the largest deviation of each kind of number from
the first condition's run and from the recorded golden (absolute for scores and p-values,
relative for losses and exact numbers) and whether the golden test's comparison accepts it.
Nothing is asserted; docs/demo.md, "The goldens", holds the measured tables. Example (a demo
run takes 4-10 minutes on 2 shared cores, an ablation 7-15):

    python benchmarks/golden_spread.py --data-root ../shared/data --work /tmp/spread
    python benchmarks/golden_spread.py --data-root ../shared/data --work /tmp/seed1 \\
        --conditions t2 --what demo            # with a change planted in src/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from goldens import (  # tests/ holds the golden rules
    GOLDEN,
    ablation_view,
    demo_view,
    deviations,
    differences,
)

SETUP = {
    "t1": "torch.set_num_threads(1)",
    "t2": "torch.set_num_threads(2)",
    "nomkldnn": "torch.set_num_threads(2); torch.backends.mkldnn.enabled = False",
}
WHAT = {
    "demo": (["--quick"], demo_view, "demo-quick-summary.json"),
    "ablate": (["--quick", "--seeds", "1"], ablation_view, "ablate-quick.json"),
}
KINDS = ("score", "p", "loss", "exact")


def run(condition: str, what: str, data_root: str, out: Path) -> None:
    """``mgll WHAT`` into ``out`` in a fresh process set up as ``condition`` (kept if done)."""
    if (out / ("summary.json" if what == "demo" else "ablation.json")).is_file():
        return
    args = [what, "--data-root", data_root, "--output-dir", str(out), *WHAT[what][0]]
    code = (
        f"import sys, torch; {SETUP[condition]}; from mgll.cli import main; "
        f"sys.exit(main({args!r}))"
    )
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run([sys.executable, "-c", code], check=True, stdout=log, stderr=log)


def row(name: str, got: object, expected: object) -> str:
    """One table row: the largest deviation per kind and whether the golden rules accept it."""
    found = deviations(got, expected)
    cells = [f"{found[k][0]:.2e} ({found[k][1]})" if k in found else "-" for k in KINDS]
    verdict = "holds" if not differences(got, expected) else "fails"
    return f"| {name} | " + " | ".join(cells) + f" | {verdict} |"


def main() -> None:
    """Run each condition, then print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--conditions", default="t2,t1,nomkldnn")
    parser.add_argument("--what", default="demo,ablate")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("| run | score (abs) | p (abs) | loss (rel) | exact (rel) | golden |")
    print("|---|---|---|---|---|---|")
    for what in args.what.split(","):
        _, view, golden_name = WHAT[what]
        golden = json.loads((GOLDEN / golden_name).read_text(encoding="utf-8"))
        views = {}
        for condition in args.conditions.split(","):
            out = args.work / f"{what}-{condition}"
            run(condition, what, args.data_root, out)
            views[condition] = view(out)
        first = next(iter(views))
        for condition, got in views.items():
            if condition != first:
                print(row(f"{what} {condition} vs {first}", got, views[first]))
            print(row(f"{what} {condition} vs golden", got, golden))


if __name__ == "__main__":
    main()
