"""The shard commands of docs/data.md run as written (from a folder beside the shared data,
as the docs assume), the pretraining cut to one step."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from data_fixtures import require_shared
from mgll.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def _commands() -> list[list[str]]:
    """The bash block of docs/data.md that shards the chest X-rays and pretrains on them."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    block = next(b for b in blocks if "mgll data shard" in b and "mgll pretrain" in b)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in joined.splitlines() if line.strip()]


@pytest.mark.shared_data
def test_the_shard_commands_of_the_docs_run_as_written(tmp_path, monkeypatch):
    shared = require_shared("covid-cxr").parent
    repo = tmp_path / "repo"  # ../shared/data from here is the shared data, as in the docs
    repo.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared, target_is_directory=True)
    monkeypatch.chdir(repo)
    shard, pretrain = _commands()
    assert shard[:3] == ["mgll", "data", "shard"] and pretrain[:2] == ["mgll", "pretrain"]
    assert main(shard[1:]) == 0
    argv = [a.replace("$PWD", str(repo)) for a in pretrain[1:]]
    assert main([*argv, "train.max_steps=1"]) == 0
    assert (repo / "runs" / "cxr-shards" / "summary.json").is_file()
