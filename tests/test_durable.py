"""models.durable: a reader sees the old file or the whole new one, and both the data and the rename are fsynced."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.durable import create_file, fsync_dir, write_atomic, write_text_atomic


def test_write_atomic_syncs_the_file_then_the_directory(tmp_path: Path, fsynced: list[Path]) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "néw ✓")
    assert target.read_text(encoding="utf-8") == "néw ✓"
    temp, directory = fsynced
    assert temp.parent == tmp_path and temp.name.startswith(".report.json.tmp-") and temp.suffix == ".json"
    assert directory == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_file_dropped_from_the_page_cache_is_whole_on_disk(tmp_path: Path, fsynced: list[Path]) -> None:
    data = os.urandom(3 << 20)
    write_atomic(tmp_path / "update.weights", lambda temp: temp.write_bytes(data), keep_cached=False)
    assert (tmp_path / "update.weights").read_bytes() == data
    assert fsynced[0].parent == tmp_path and fsynced[1] == tmp_path  # the file, then the directory


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, fsynced: list[Path]) -> None:
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"old")

    def half_then_crash(temp: Path) -> None:
        temp.write_bytes(b"ne")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_atomic(target, half_then_crash)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]
    assert fsynced == []


def test_temp_keeps_the_suffixes_so_nibabel_compresses(tmp_path: Path) -> None:
    target = tmp_path / "dwi.nii.gz"
    image = nib.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4))
    write_atomic(target, lambda temp: nib.save(image, temp))
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert np.array_equal(nib.load(target).get_fdata(), image.get_fdata())


def test_mode_and_batch_directory_sync(tmp_path: Path, fsynced: list[Path]) -> None:
    first = write_atomic(tmp_path / "a.dcm", lambda temp: temp.write_bytes(b"a"), mode=0o600, sync_directory=False)
    second = write_atomic(tmp_path / "b.dcm", lambda temp: temp.write_bytes(b"b"), sync_directory=False)
    fsync_dir(tmp_path)
    assert [p.parent for p in fsynced] == [tmp_path, tmp_path, tmp_path.parent]
    assert fsynced[-1] == tmp_path
    assert first.stat().st_mode & 0o777 == 0o600
    assert second.stat().st_mode & 0o777 == 0o644 & ~_umask()


def test_create_file_never_overwrites_nor_follows_a_link(tmp_path: Path, fsynced: list[Path]) -> None:
    key = create_file(tmp_path / "web-secret.key", b"k" * 32, mode=0o600)
    assert key.read_bytes() == b"k" * 32 and key.stat().st_mode & 0o777 == 0o600
    assert fsynced == [key, tmp_path]
    with pytest.raises(FileExistsError):
        create_file(key, b"other")
    assert key.read_bytes() == b"k" * 32
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):  # O_EXCL refuses a link, dangling or not
        create_file(tmp_path / "link", b"x")
    assert not (tmp_path / "elsewhere").exists()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
