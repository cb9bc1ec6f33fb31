"""What the adapters of datasets with an official train/test split share.

Such releases give no patient ids, so each photo is its own eye, except byte-identical files:
copies inside one set share one patient id (one eye), and a test photo identical to a training
photo is dropped from the test set (counted in ``excluded``, naming both files), keeping the
training set whole, so no test photo a model has trained on is scored as unseen. A seeded
share of the training eyes (whole eyes) is then held out as ``val``.
"""

from __future__ import annotations

import numpy as np

from mgll.data.records import Record, RecordSet
from mgll.data.splits import file_digest


def link_identical(result: RecordSet, training_set: str) -> None:
    """One patient id per byte-identical photo within a set; a test photo identical to a
    ``training_set`` photo is dropped. Records carry ``metadata["set"]``; training records
    come first."""
    first: dict[str, Record] = {}
    kept = []
    for record in result.records:
        digest = file_digest(record.image)
        owner = first.setdefault(digest, record) if digest is not None else record
        if owner is not record:
            if owner.metadata["set"] != record.metadata["set"]:
                result.exclude(
                    f"test photo identical to a {training_set} photo (test copy dropped)",
                    f"{record.image.name} = {owner.image.name}",
                )
                continue
            record.patient_id = owner.patient_id
            record.metadata["identical_to"] = owner.image.name
        kept.append(record)
    result.records = kept


def hold_out_val(result: RecordSet, fraction: float, seed: int) -> None:
    """Move a seeded ``fraction`` of the training eyes (whole eyes) to ``val``."""
    eyes = sorted({r.patient_id for r in result.records if r.metadata["split"] == "train"})
    count = round(fraction * len(eyes))
    chosen = set(np.random.default_rng(seed).permutation(eyes)[:count].tolist())
    for record in result.records:
        if record.metadata["split"] == "train" and record.patient_id in chosen:
            record.metadata["split"] = "val"
