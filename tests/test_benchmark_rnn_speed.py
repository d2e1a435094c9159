"""The CPU benchmark's steps run for every table and variant (a long benchmark run should not die on a
typo), and it names the machine with its caches."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def rnn_speed(benchmark_script):
    return benchmark_script("rnn_speed")


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


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_the_per_gate_hand_loop_is_torch_cells_recurrence_when_its_gates_share_masks(rnn_speed, kind):
    """The hand loop that the reference loop is timed against computes a real LSTM / GRU with its masks where
    Keras puts them: with every gate's mask the same, it equals a loop of torch's cell on masked inputs."""
    import torch

    torch.manual_seed(0)
    batch, steps, features, units = 3, 5, 4, 6
    gates = 4 if kind == "LSTM" else 3
    cell = getattr(torch.nn, kind + "Cell")(features, units).double()
    x = torch.randn(batch, steps, features, dtype=torch.float64)
    input_mask = torch.bernoulli(torch.full((batch, features), 0.7, dtype=torch.float64)) / 0.7
    state_mask = torch.bernoulli(torch.full((batch, units), 0.7, dtype=torch.float64)) / 0.7
    got = rnn_speed.per_gate_loop(cell, x, input_mask.expand(gates, -1, -1), state_mask.expand(gates, -1, -1))
    h = c = x.new_zeros(batch, units)
    expected = []
    for t in range(steps):
        if kind == "LSTM":
            h, c = cell(x[:, t] * input_mask, (h * state_mask, c))
        else:
            # torch's cell adds h itself in z * h: pass the masked h for the products only
            gi = torch.nn.functional.linear(x[:, t] * input_mask, cell.weight_ih, cell.bias_ih)
            gh = torch.nn.functional.linear(h * state_mask, cell.weight_hh, cell.bias_hh)
            (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3, 1), gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(i_n + r * hn) + z * h
        expected.append(h)
    torch.testing.assert_close(got, torch.stack(expected, 1), rtol=1e-12, atol=1e-12)
    plain = rnn_speed.per_gate_loop(cell, x, x.new_ones(gates, batch, features), x.new_ones(gates, batch, units))
    reference = getattr(torch.nn, kind)(features, units, batch_first=True).double()
    reference.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    torch.testing.assert_close(plain, reference(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,table", [("LSTM", "inference"), ("LSTM", "train"), ("LSTM", "proj-inference"),
                                        ("LSTM", "proj-train"), ("GRU", "inference"), ("GRU", "train")])
def test_the_floor_counts_the_products_the_reference_loop_runs(rnn_speed, kind, table):
    """The products floor's operation count is what torch's own counter sees the reference loop compute."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import droprnn

    shape = (2, 3, 4, 6)
    projection = {"proj_size": 3} if table in rnn_speed.LSTM_ONLY else {}
    layer = getattr(droprnn, kind)(6, return_sequences=True, input_size=4, impl="reference", **projection)
    x = torch.randn(*shape[:3], requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = layer(x, training=True)
        if table.endswith("train"):
            out.sum().backward()
    assert rnn_speed.product_flops(kind, shape, table) == counter.get_total_flops()


def test_the_product_rate_is_a_measured_positive_rate(rnn_speed):
    rate = rnn_speed.product_rate("float32", repeats=1)
    assert 1e3 < rate < 1e12  # FLOP per millisecond: between 1 MFLOP/s and 1 PFLOP/s


def test_a_saved_run_prints_as_markdown_tables_with_ratios_and_memory(rnn_speed):
    rows = [{"table": "inference", "layer": "LSTM", "shape": [1, 2, 3, 4], "variant": "torch.nn", "ms": 2.0,
             "ratio": 1.0, "peak_mb": 5.0},
            {"table": "inference", "layer": "LSTM", "shape": [1, 2, 3, 4], "variant": "droprnn", "ms": 1.5,
             "ratio": 0.75, "peak_mb": 4.0},
            {"table": "inference", "layer": "LSTM", "shape": [1, 2, 3, 4], "variant": "products floor", "ms": 0.5,
             "ratio": 0.25, "peak_mb": float("nan")}]
    text = rnn_speed.markdown(rows)
    assert "| layer | shape (B, T, D, U) | torch.nn | droprnn | products floor | peak MB: torch.nn / droprnn |" in text
    assert "| LSTM | (1, 2, 3, 4) | 2.0 ms | 1.5 (0.75×) | 0.5 (0.25×) | 5.0 / 4.0 |" in text
