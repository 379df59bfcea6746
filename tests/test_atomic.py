"""Atomic writes: a failure part-way leaves the old version whole and no temp behind; directories are replaced
whole; writers of one target do not share a temp name; new files get the umask's permissions."""

import os
import stat

import pytest
import torch

from labkit import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "record.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    with atomic.atomic(target, directory=True) as tmp:
        (tmp / "a.bin").write_text("v1")
        (tmp / "old-only.bin").write_text("v1")
    with atomic.atomic(target, directory=True) as tmp:
        (tmp / "a.bin").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"] and (target / "a.bin").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old copy is gone too
    with pytest.raises(ValueError):
        with atomic.atomic(target, directory=True) as tmp:
            (tmp / "a.bin").write_text("v3")
            raise ValueError
    assert (target / "a.bin").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_two_writers_of_one_target_get_different_temps(tmp_path):
    target = tmp_path / "engine.plan"
    with atomic.atomic(target) as a, atomic.atomic(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer writer commits last


def test_new_files_get_the_umask_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    written = atomic.write_text(tmp_path / "atomic", "x")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_save_student_failing_part_way_keeps_the_previous_save(tmp_path, monkeypatch):
    from labkit.distill.students import load_student, save_student
    from tests.conftest import tiny_llama

    path = save_student(tiny_llama(seed=1), tmp_path / "student")
    before = load_student(path).model.embed_tokens.weight.clone()
    broken = tiny_llama(seed=2)

    def half_save(d, **kw):
        (d / "config.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(broken, "save_pretrained", half_save)
    with pytest.raises(OSError, match="disk full"):
        save_student(broken, path)
    assert torch.equal(load_student(path).model.embed_tokens.weight, before)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_save_pruned_replaces_a_directory_checkpoint_whole(tmp_path):
    from labkit.prune.structured import save_pruned
    from tests.conftest import tiny_llama

    path = tmp_path / "pruned"
    save_pruned(tiny_llama(seed=1), path)
    (path / "stale.txt").write_text("from an older save")
    save_pruned(tiny_llama(seed=2), path)
    assert not (path / "stale.txt").exists() and (path / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]
