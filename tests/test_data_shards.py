"""WebDataset shards: written deterministically and resumably, read as the file dataset reads,
split across ranks and workers, resumed exactly, damaged members skipped and named."""

from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import require_shared, write_png
from mgll.cli import main
from mgll.data import prepare_data
from mgll.data.shards import MANIFEST, ShardError, write_shards
from mgll.seeding import sample_seed
from mgll.training.sampling import SeededSamples

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
SIZE = 8  # the training fakes' image size, so the same shards feed FakeModel runs


def corpus(folder: Path, n: int = 40, grades: tuple[str, ...] = ("none", "mild", "severe")) -> Path:
    """``n`` small images (one patient each), a multi-label level with missing labels and a
    single-label level drawing one of three prompts; returns the spec's path."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["path,patient,finding,grade"]
    for i in range(n):
        write_png(folder / "images" / f"{i}.png", rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
        finding = ["mass", "mass|effusion", "", "nodule"][i % 4]
        rows.append(f"{i}.png,p{i},{finding},{grades[i % len(grades)]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    (folder / "spec.yaml").write_text(
        "table: labels.csv\nimage: {column: path, root: images}\npatient: patient\nlevels:\n"
        "  - {name: finding, label: finding, separator: '|', prompt: 'x-ray: {label}'}\n"
        "  - {name: grade, label: grade,\n"
        "     prompt: ['grade {label}', 'a {label} case', 'graded {label}']}\n"
    )
    return folder / "spec.yaml"


def data_cfg(spec: Path, **extra):
    split = {"train": 0.8, "val": 0.2, "test": 0.0, "seed": 0}
    return {"source": str(spec), "split": split, **extra}


def shard(spec: Path, out: Path, shard_size: int = 4, **kwargs) -> dict:
    prepared = prepare_data(data_cfg(spec), None, seed=0)
    return write_shards(
        prepared, out, image_size=SIZE, shard_size=shard_size, log=lambda _: None, **kwargs
    )


def shard_data(out: Path | str, seed: int = 0, **extra):
    return prepare_data({"source": "shards", "path": str(out), **extra}, None, seed)


def splits(data, train_transform: bool = True):
    return data.datasets(image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("image_format", ["npy", "png"])
def test_shards_give_the_file_datasets_pixels_texts_and_labels(tmp_path, image_format):
    spec = corpus(tmp_path / "data")
    shard(spec, tmp_path / "shards", image_format=image_format)
    files = splits(prepare_data({**data_cfg(spec), "cache_dir": False}, None, seed=3))
    streams = splits(shard_data(tmp_path / "shards", seed=3))
    assert [lv.name for lv in shard_data(tmp_path / "shards").levels] == ["finding", "grade"]
    for name in ("train", "val"):
        stream, reference = streams[name], SeededSamples(files[name])
        assert len(stream) == len(files[name]) > 0
        for epoch in (0, 1, 2):  # the grade prompt is drawn per (seed, epoch, index)
            stream.set_epoch(epoch)
            items = list(stream)
            assert sorted(it["index"] for it in items) == list(range(len(reference)))
            for it in items:
                i = it["index"]
                ref = reference[(i, epoch, sample_seed(3, epoch, i))]  # augmented alike
                assert it["texts"] == ref["texts"]
                assert torch.equal(it["image"], ref["image"])
                assert torch.equal(it["labels"][0], ref["labels"][0])  # multi-hot
                assert it["labels"][1] == ref["labels"][1]
    drawn = set()
    for epoch in range(3):
        streams["train"].set_epoch(epoch)
        drawn |= {it["texts"][1].split()[0] for it in streams["train"]}
    assert drawn == {"grade", "a", "graded"}  # the three prompts, drawn afresh per epoch


def test_manifest_counts_sources_checksums_and_settings(tmp_path):
    spec = corpus(tmp_path / "data", n=10)
    manifest = shard(spec, tmp_path / "shards", shard_size=3)
    assert manifest["complete"] and manifest["preprocessing"]["image_size"] == SIZE
    assert manifest["splits"]["train"]["samples"] == 8
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar"]  # fmt: skip
    assert manifest["levels"][0] == {
        "name": "finding",
        "vocabulary": ["effusion", "mass", "nodule"],
        "multi_label": True,
    }
    prepared = prepare_data(data_cfg(spec), None, seed=0)
    train = prepared.records.subset(prepared.indices["train"])
    expected = [dict(c) for c in train.label_counts()]  # "" counts the missing
    assert manifest["splits"]["train"]["label_counts"] == expected
    assert manifest["sources"] == prepared.source_counts() == {"data": {"train": 8, "val": 2,
                                                                       "test": 0}}  # fmt: skip
    split_csv = (tmp_path / "shards" / "split.csv").read_text().splitlines()
    assert split_csv[0] == "image,source,patient_id,split" and len(split_csv) == 11
    import hashlib

    for name, entry in manifest["shards"].items():
        data = (tmp_path / "shards" / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        with tarfile.open(tmp_path / "shards" / name) as tar:  # plain WebDataset members
            members = tar.getmembers()
        assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
        assert [m.name.split(".")[1] for m in members][:2] == ["npy", "json"]


def test_rerun_is_byte_identical_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    spec = corpus(tmp_path / "data", n=20)
    shard(spec, tmp_path / "a")
    shard(spec, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    import mgll.data.shards.writer as shards_module

    real, calls = shards_module.encode_image, []

    def dies_on_the_ninth(pixels, image_format):
        calls.append(1)
        if len(calls) == 9:  # inside the third shard (4 samples each)
            raise KeyboardInterrupt
        return real(pixels, image_format)

    monkeypatch.setattr(shards_module, "encode_image", dies_on_the_ninth)
    with pytest.raises(KeyboardInterrupt):
        shard(spec, tmp_path / "c")
    monkeypatch.setattr(shards_module, "encode_image", real)
    partial = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert not partial["complete"] and sorted(partial["shards"]) == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert not list((tmp_path / "c").glob(".*tmp*"))  # no half-written shard left
    with pytest.raises(ShardError, match="incomplete"):
        shard_data(tmp_path / "c")
    (tmp_path / "c" / "train-000001.tar").write_bytes(b"damaged")  # a kept shard gone bad
    messages: list[str] = []
    prepared = prepare_data(data_cfg(spec), None, seed=0)
    write_shards(prepared, tmp_path / "c", image_size=SIZE, shard_size=4, log=messages.append)
    assert "kept 1 finished shard(s)" in messages[-1]
    assert sum("wrote" in m for m in messages) == 4  # train 1 again, then 2, 3 and val 0
    assert _files(tmp_path / "c") == _files(tmp_path / "a")


def test_a_folder_of_another_corpus_is_refused_untouched(tmp_path, capsys):
    spec = corpus(tmp_path / "data", n=10)
    shard(spec, tmp_path / "shards")
    before = _files(tmp_path / "shards")
    other = corpus(tmp_path / "other", n=10, grades=("low", "high"))
    with pytest.raises(ShardError, match="holds the shards of another corpus"):
        shard(other, tmp_path / "shards")
    with pytest.raises(ShardError, match="holds the shards of another corpus"):
        shard(spec, tmp_path / "shards", shard_size=5)
    assert _files(tmp_path / "shards") == before
    argv = ["data", "shard", str(other), "--output-dir", str(tmp_path / "shards"),
            "--image-size", str(SIZE), "--shard-size", "4"]  # fmt: skip
    assert main(argv) == 1  # a user error, as every command's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mgll data shard: error: --output-dir"), err
    assert _files(tmp_path / "shards") == before


@pytest.mark.parametrize("size", ["-5", "0"])
def test_an_image_size_below_one_pixel_is_refused_before_the_folder_exists(tmp_path, capsys, size):
    spec = corpus(tmp_path / "data", n=10)
    out = tmp_path / "shards"
    assert main(["data", "shard", str(spec), "--output-dir", str(out), "--image-size", size]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-size must be a side in pixels >= 1" in err
    assert err.endswith(f"got {size}\n")
    assert not out.exists()


@pytest.mark.shared_data
def test_shard_reads_the_folder_as_given_as_data_check_does(tmp_path, monkeypatch, capsys):
    (tmp_path / "photos").symlink_to(require_shared("csdi-fundus"), target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    rest = ["--data-root", "elsewhere", "--split-seed", "0"]
    assert main(["data", "check", "photos", *rest]) == 0
    assert "187" in capsys.readouterr().out
    out = ["--output-dir", "shards", "--image-size", str(SIZE)]
    assert main(["data", "shard", "photos", *rest, *out]) == 0
    # the printed data.path works under any --data-root: it is absolute
    assert f"data.path={tmp_path / 'shards'}\n" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    assert sum(part["samples"] for part in manifest["splits"].values()) == 187


def _epoch(batches, workers: int, epoch: int, start: int = 0) -> list[list[int]]:
    batches.set_epoch(epoch, start)
    loader = DataLoader(batches, batch_size=None, num_workers=workers)
    return [b["indices"].tolist() for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_gives_the_same_batches(tmp_path, workers):
    spec = corpus(tmp_path / "data", n=40)
    shard(spec, tmp_path / "shards", shard_size=3)  # 32 train samples in 11 shards
    train = splits(shard_data(tmp_path / "shards", shuffle_buffer=5))["train"]
    batches = train.batches(4, workers=workers)
    full = _epoch(batches, workers, epoch=1)
    assert len(full) == batches.steps_per_epoch > 4
    assert len({i for b in full for i in b}) == 4 * len(full)  # no sample twice in an epoch
    for start in (1, 3, 4):
        assert _epoch(batches, workers, epoch=1, start=start) == full[start:]
    assert _epoch(batches, workers, epoch=2) != full  # a new epoch, a new order


def test_a_new_epoch_reorders_both_the_shards_and_the_samples_within_them(tmp_path):
    """Each of the two shuffles changes with the epoch on its own: the shards' reading order
    (11 shards), and the shuffle buffer's order within one shard (a single 32-sample shard,
    whose reading order cannot change); every epoch reads the same samples."""
    spec = corpus(tmp_path / "data", n=40)
    shard(spec, tmp_path / "many", shard_size=3)
    many = splits(shard_data(tmp_path / "many", shuffle_buffer=5))["train"].batches(4)
    reading = []
    for epoch in (1, 2):
        many.set_epoch(epoch)
        reading.append([s.name for s in many.stream_shards(0)])
    assert reading[0] != reading[1] and sorted(reading[0]) == sorted(reading[1])
    shard(spec, tmp_path / "one", shard_size=40)
    one = splits(shard_data(tmp_path / "one", shuffle_buffer=8))["train"]
    assert len(one.shards) == 1
    batches = one.batches(4)
    orders = [[i for b in _epoch(batches, 0, epoch) for i in b] for epoch in (1, 2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(32))
    assert orders[0] != sorted(orders[0])  # shuffled at all


def test_ranks_and_workers_read_disjoint_shards_covering_the_corpus(tmp_path):
    spec = corpus(tmp_path / "data", n=40)
    shard(spec, tmp_path / "shards", shard_size=2)  # 16 train shards
    train = splits(shard_data(tmp_path / "shards"))["train"]
    plans = [train.batches(2, rank, 2, workers=2) for rank in range(2)]
    for epoch in (0, 1):
        seen: list[set[str]] = []
        for plan in plans:
            plan.set_epoch(epoch)
            seen.append({s.name for j in range(2) for s in plan.stream_shards(2 * plan.rank + j)})
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == {s.name for s in train.shards}
        read = [{i for b in _epoch(plan, 2, epoch) for i in b} for plan in plans]
        assert not read[0] & read[1]
        assert len(_epoch(plans[0], 2, epoch)) == len(_epoch(plans[1], 2, epoch))
    with pytest.raises(ShardError, match="cannot feed 4 process"):
        train.batches(2, 0, 4, workers=5)


def test_damaged_members_are_named_counted_and_skipped(tmp_path):
    spec = corpus(tmp_path / "data", n=40)
    shard(spec, tmp_path / "shards", shard_size=4)
    folder = tmp_path / "shards"
    broken = folder / "train-000001.tar"
    data = bytearray(broken.read_bytes())
    offset = data.index(b"\x93NUMPY")  # the first image member: no longer an image
    data[offset : offset + 6] = b"garbag"
    broken.write_bytes(bytes(data))
    truncated = folder / "train-000003.tar"
    truncated.write_bytes(truncated.read_bytes()[:1500])  # ends inside its first member
    with pytest.warns(UserWarning, match=r"train-000003\.tar has 1500 bytes"):
        train = splits(shard_data(folder, shuffle_buffer=0))["train"]
    batches = train.batches(4, workers=0, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epoch = list(DataLoader(batches, batch_size=None))
    assert len(epoch) == batches.steps_per_epoch  # damaged samples replaced by readable ones
    skipped = [p for b in epoch for p in b["skipped"]]
    assert skipped[0].startswith("train-000001.tar/") and "train-000003.tar/" in skipped[1]
    text = "\n".join(str(w.message) for w in caught)
    assert "train-000001.tar/000000004.npy: not an image" in text
    assert "train-000003.tar is damaged after 1 sample(s) (it ends after 1 of 4)" in text
    assert "train-000003.tar/000000012: has members ['npy']; expected an image and .json" in text


def test_a_missing_shard_is_an_error_at_start(tmp_path):
    spec = corpus(tmp_path / "data", n=10)
    shard(spec, tmp_path / "shards")
    (tmp_path / "shards" / "val-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"shard .*val-000000\.tar \(listed in .*\) does not"):
        shard_data(tmp_path / "shards")
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        shard_data(tmp_path / "data")


def test_brace_patterns_and_pipes_select_shards(tmp_path):
    spec = corpus(tmp_path / "data", n=20)
    shard(spec, tmp_path / "shards")
    folder = tmp_path / "shards"
    local = shard_data(f"{folder}/train-{{000000..000001}}.tar")
    assert [s.name for s in local.shards("train")] == ["train-000000.tar", "train-000001.tar"]
    assert local.shards("val") == []
    piped = shard_data(f"pipe:cat {folder}/train-{{000000..000003}}.tar")
    assert piped.shards("train")[1].url == f"pipe:cat {folder}/train-000001.tar"
    from_pipe = list(splits(piped)["train"])
    from_files = list(splits(shard_data(folder))["train"])
    assert [it["index"] for it in from_pipe] == [it["index"] for it in from_files]
    with pytest.raises(ShardError, match=r"names no manifest"):
        shard_data(f"pipe:cat {folder}/")
    with pytest.raises(ShardError, match=r"train-000004\.tar is not listed .* \(1 such"):
        shard_data(f"{folder}/train-{{000002..000004}}.tar")  # 16 train samples: 4 shards


def test_validation_reads_every_sample_once_even_with_idle_workers(tmp_path):
    spec = corpus(tmp_path / "data", n=20)
    shard(spec, tmp_path / "shards", shard_size=8)  # val: 4 samples in one shard
    val = splits(shard_data(tmp_path / "shards"))["val"]
    batches = val.batches(3, workers=2, shuffle=False, drop_last=False)
    read = [b["indices"].tolist() for b in DataLoader(batches, batch_size=None, num_workers=2)]
    assert read == [[0, 1, 2], [3]] and len(batches) == 2
    with pytest.raises(ShardError, match=r"data\.levels: shards keep the levels"):
        shard_data(tmp_path / "shards", levels=[0])


def test_a_pool_is_sharded_with_its_split_and_sources_and_weights_are_refused(tmp_path):
    from test_data_pool import POOL, _pool

    path = _pool(tmp_path / "w", POOL.replace("weight: 3", "weight: 1"))
    prepared = prepare_data({"source": str(path)}, None, seed=0)  # the pool's own split
    manifest = write_shards(prepared, tmp_path / "shards", image_size=SIZE, log=lambda _: None)
    assert manifest["sources"] == prepared.source_counts() and len(manifest["sources"]) == 2
    for name in ("train", "val", "test"):
        assert manifest["splits"][name]["samples"] == len(prepared.indices[name])
    streams = splits(shard_data(tmp_path / "shards"))
    test_items = sorted(it["index"] for it in streams["test"])
    assert test_items == list(range(len(prepared.indices["test"])))
    rows = (tmp_path / "shards" / "split.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[-1] for r in rows) == sorted(
        name for name in ("train", "val", "test") for _ in prepared.indices[name]
    )
    weighted = prepare_data({"source": str(_pool(tmp_path / "x"))}, None, seed=0)
    with pytest.raises(ShardError, match="weights its sources"):
        write_shards(weighted, tmp_path / "other", image_size=SIZE, log=lambda _: None)
    assert not (tmp_path / "other").exists()
