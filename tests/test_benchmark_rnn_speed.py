"""The CPU benchmark's steps run for every table and variant (a long benchmark run should not die on a
typo), and it names the machine with its caches."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "rnn_speed.py"


@pytest.fixture(scope="module")
def rnn_speed():
    spec = importlib.util.spec_from_file_location("rnn_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rnn_speed"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_every_row_of_every_table_runs(rnn_speed, kind):
    for table, (_, variants, _, _) in rnn_speed.TABLES.items():
        if kind != "LSTM" and table in rnn_speed.LSTM_ONLY:
            continue
        for variant in variants:
            if variant == "droprnn rd compiled":
                continue  # compiling is tested in test_compile.py
            rnn_speed.make_step(kind, variant, (2, 3, 4, 5), table=table)()


def test_the_machine_line_names_the_cpu_and_its_caches(rnn_speed):
    line = rnn_speed.machine()
    assert "L2" in line and "threads" in line
