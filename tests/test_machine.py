"""The fused kernels' blocking comes from the machine's caches (kernels/cpu/machine.py)."""

from __future__ import annotations

import pytest

from droprnn.kernels.cpu import machine


def fake_sysfs(tmp_path, caches: list[tuple[int, str, str]]):
    for k, (level, kind, size) in enumerate(caches):
        folder = tmp_path / f"index{k}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return tmp_path


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    def use(caches):
        monkeypatch.setattr(machine, "_CACHES", fake_sysfs(tmp_path, caches))
        machine.caches.cache_clear()
        machine.blocking.cache_clear()

    yield use
    machine.caches.cache_clear()
    machine.blocking.cache_clear()


def test_the_xeon_measured_constants_follow_from_its_caches(sysfs):
    sysfs([(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"), (3, "Unified", "491520K")])
    assert machine.caches() == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 480 << 20}
    assert machine.blocking() == machine.Blocking(one_panel_bytes=512 << 10, defer_bytes=1 << 20,
                                                  defer_bytes_per_row=48 << 10, gemm_block=256)


def test_another_cpu_gets_its_own_blocking(sysfs):
    # An AMD EPYC (Zen 4/5): 32 or 48 KiB of L1d, 1 MiB of L2 per core, L3 shared by a complex.
    sysfs([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"), (3, "Unified", "32M")])
    blocking = machine.blocking()
    assert blocking.one_panel_bytes == 256 << 10 and blocking.defer_bytes == 512 << 10
    assert blocking.defer_bytes_per_row == 32 << 10
    assert blocking.gemm_block % 16 == 0 and blocking.gemm_block ** 2 * 4 <= (1 << 20) // 8
    assert "L2 1024 KiB" in machine.describe()


def test_without_sysfs_the_measured_machine_stands_in(sysfs, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_CACHES", tmp_path / "missing")
    machine.caches.cache_clear()
    assert machine.caches()["l2"] == 2 << 20 and machine.blocking().gemm_block == 256
