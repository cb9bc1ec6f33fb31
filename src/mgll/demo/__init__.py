"""``mgll demo``: random init vs CLIP vs MGLL on one dataset, end to end, on a laptop CPU.

Three image encoders with the same architecture, seed, data order and step budget:
``random`` (the seeded initial weights, no pretraining), ``clip`` (the CLIP loss on one caption
per image: all of its level texts joined) and ``mgll`` (the MGLL loss on every level). Phases,
each resumed when the command is re-run with the same ``--output-dir``:

1. folds: patient-level stratified K-fold cross-validation on the dataset's main level,
   patients joined across byte-identical image files (``OUT/folds/fold<k>.csv``);
2. pretrain: ``clip`` and ``mgll`` once per fold on that fold's training patients
   (``OUT/<encoder>/fold<k>/``, ordinary ``mgll pretrain`` run folders);
3. evaluate: per encoder and classification level, a linear probe per fold and zero-shot
   classification, the held-out predictions pooled over the folds
   (``OUT/<encoder>/probe-<level>/``, ``OUT/<encoder>/zeroshot-<level>/``: mgll.eval folders);
4. compare: MGLL - CLIP and MGLL - random with paired patient-bootstrap CIs
   (``OUT/compare/``), then ``OUT/summary.json``, a printed table and ``OUT/report.html``
   (:mod:`mgll.demo.report`).

See docs/demo.md for the recipe, the protocol and what was measured.

The names below load when first asked for, so the command layer (:mod:`mgll.demo.cli`) lists
the recipes without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mgll.lazy import lazy_names

if TYPE_CHECKING:
    from mgll.demo.recipes import RECIPES
    from mgll.demo.run import run_demo
    from mgll.demo.settings import DemoError

__all__ = ["RECIPES", "DemoError", "run_demo"]

_HOMES = {
    "RECIPES": "mgll.demo.recipes",
    "DemoError": "mgll.demo.settings",
    "run_demo": "mgll.demo.run",
}


__getattr__ = lazy_names(__name__, _HOMES)
