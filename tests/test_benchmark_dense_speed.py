"""The Dense benchmark's parts: its pair of layers holds the same weights, its check catches a difference,
and a quick run prints one row per shape naming the product."""

from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture(scope="module")
def dense_speed(benchmark_script):
    return benchmark_script("dense_speed")


def test_the_pair_computes_the_same_and_the_check_sees_a_difference(dense_speed):
    theirs, ours, x = dense_speed.pair(5, 4, 3)
    assert dense_speed.check(theirs, ours, x) < 1e-6
    with torch.no_grad():
        ours.bias.add_(1e-3)
    assert dense_speed.check(theirs, ours, x) > 1e-5


def test_a_quick_run_prints_a_row_per_shape(dense_speed, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dense_speed.py", "--quick", "--threads", "1", "--shapes", "8,4,3;16,8,2"])
    assert dense_speed.main() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (") and "rows" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| (8, 4, 3)", "| (16, 8, 2)"]
    assert all(" | F.linear | " in row and row.count(" | ") == 10 for row in rows)  # products this small stay with F.linear
