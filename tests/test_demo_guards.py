"""Guards on the demo's protocol, by spies on what each pretraining run was given: fold k's
model never trains on fold k's held-out patients, and CLIP and MGLL share one seed."""

from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import require_shared


@pytest.mark.shared_data
def test_each_fold_pretrains_on_its_training_patients_with_the_seed_of_the_run(
    tmp_path, monkeypatch
):
    import mgll.demo.folds
    from mgll.data.build import prepare_data
    from mgll.demo.folds import patient_folds, pretrain_folds, write_folds
    from mgll.demo.progress import Progress
    from mgll.demo.settings import PRETRAINED, RECIPES, Demo, load_demo_records

    root = require_shared("csdi-fundus").parent
    demo = Demo(RECIPES["csdi-fundus"], root, tmp_path / "demo", quick=True, seed=3)
    records = load_demo_records(demo.folder)
    fold = patient_folds(records, demo.recipe.main_level, demo.folds, demo.seed)
    write_folds(demo, records, fold)

    trained: dict[tuple[str, str], tuple[int, set[str]]] = {}

    def spy(cfg, data_root, output_dir, resume=None, data_builder=None):
        """What the trainer would train on: the records of its training split."""
        prepared = prepare_data(cfg.data, data_root, cfg.train.seed)
        images = {str(prepared.records.records[i].image) for i in prepared.indices["train"]}
        trained[(cfg.loss.name, output_dir.name)] = (cfg.train.seed, images)
        (output_dir / "summary.json").write_text('{"seconds": 0.0}')

    monkeypatch.setattr(mgll.demo.folds, "train", spy)  # folds imports train at the top
    progress = Progress(runs=4, evaluations=0, echo=lambda _: None, start=0.0)
    pretrain_folds(demo, PRETRAINED, progress)

    assert set(trained) == {(e, f"fold{k}") for e in PRETRAINED for k in range(demo.folds)}
    group = {str(r.image): r.patient_id for r in records.records}
    for (encoder, name), (seed, images) in trained.items():
        assert seed == demo.seed, encoder  # CLIP and MGLL: the run's seed, the same
        k = int(name[len("fold") :])
        held_out = {str(records.records[i].image) for i in np.flatnonzero(fold == k)}
        rest = {str(records.records[i].image) for i in np.flatnonzero(fold != k)}
        assert images == rest  # every training patient of the fold, no held-out one
        assert {group[i] for i in images}.isdisjoint({group[i] for i in held_out})
