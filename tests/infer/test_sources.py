"""Inputs of predict: file, folder, glob and list sources; disjoint, complete sharding."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infer.conftest import write_images
from visionpipe.errors import VisionpipeError
from visionpipe.infer.sources import iter_indexed, iter_sources, parse_shard, shard_suffix


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    paths = write_images(tmp_path / "in", 9)
    (tmp_path / "in" / "a" / "readme.txt").write_text("not an image")
    (tmp_path / "in" / "a" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "in" / "b" / "deeper").mkdir()
    extra = tmp_path / "in" / "b" / "deeper" / "z.jpg"
    extra.write_bytes(paths[0].read_bytes())
    # a folder's files (sorted) come before its sub-folders (sorted), recursively
    return tmp_path / "in", sorted(paths) + [extra]


def test_folder_is_recursive_sorted_and_skips_non_images(folder):
    root, expected = folder
    got = list(iter_sources(str(root)))
    assert got == expected
    assert not any(p.name in ("readme.txt", ".hidden.png") for p in got)
    assert list(iter_sources(str(root))) == got, "the order is deterministic"


def test_single_file_glob_and_list(folder, tmp_path):
    root, expected = folder
    assert list(iter_sources(str(expected[3]))) == [expected[3]]
    assert list(iter_sources(str(root / "a" / "*.png"))) == sorted(p for p in expected if p.parent.name == "a")
    assert list(iter_sources(str(root / "**" / "*.jpg"))) == [root / "b" / "deeper" / "z.jpg"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n{expected[2].relative_to(tmp_path)}\n\n{expected[0]}\n")
    assert list(iter_sources(str(lst))) == [expected[2], expected[0]], "list order, relative to the list's folder"


def test_missing_source_is_one_clear_error(tmp_path):
    with pytest.raises(VisionpipeError, match="no such file, folder or glob"):
        list(iter_sources(str(tmp_path / "nope")))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 13])
def test_shards_are_disjoint_and_complete(folder, n):
    root, expected = folder
    shards = [list(iter_indexed(str(root), (i, n))) for i in range(n)]
    indices = [k for s in shards for k, _ in s]
    assert sorted(indices) == list(range(len(expected))), "every input in exactly one shard"
    assert len(set(indices)) == len(indices)
    for i, s in enumerate(shards):
        assert all(k % n == i for k, _ in s)
        assert [p for _, p in s] == [expected[k] for k, _ in s], "index is the position in the whole input"


def test_parse_shard(monkeypatch):
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "1/0", "a/b", "3"):
        with pytest.raises(VisionpipeError, match="--shard"):
            parse_shard(bad)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_shard(None) == (3, 4), "torchrun's rank and world size"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(VisionpipeError, match="RANK"):
        parse_shard(None)
    assert shard_suffix((0, 1)) == "" and shard_suffix((1, 4)) == ".shard1of4"
