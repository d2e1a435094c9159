"""The fused kernels' blocking comes from the machine's caches (kernels/cpu/machine.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch

import droprnn
from droprnn.kernels import cpu
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


# ---------------------------------------------------------------------------------------------- products
@pytest.fixture
def timed(monkeypatch):
    """Replaces the timing with given numbers, and counts the measurements."""
    calls = []

    def use(torch_seconds: float, brgemm_seconds: float):
        def fake(rounds: int = 5):
            calls.append(rounds)
            return {"torch": torch_seconds, "brgemm": brgemm_seconds}

        monkeypatch.setattr(machine, "_time_products", fake)
        return calls

    monkeypatch.delenv(machine.PRODUCTS_ENV, raising=False)
    return use


def test_brgemm_is_chosen_only_where_it_wins_by_five_percent(timed, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    timed(1.0, 0.96)
    assert machine.products_choice(tmp_path / "a", 2) == "torch"
    timed(1.0, 0.90)
    assert machine.products_choice(tmp_path / "b", 2) == "brgemm"


def test_the_choice_is_measured_once_per_thread_count_and_kept(timed, tmp_path):
    calls = timed(1.0, 0.5)
    assert machine.products_choice(tmp_path, 2) == "brgemm"
    assert json.loads((tmp_path / "products.json").read_text()) == {"2": "brgemm"}
    timed(0.5, 1.0)  # a later measurement would say otherwise: the kept answer stands
    assert machine.products_choice(tmp_path, 2) == "brgemm"
    assert machine.products_choice(tmp_path, 1) == "torch"  # another thread count is measured
    assert json.loads((tmp_path / "products.json").read_text()) == {"2": "brgemm", "1": "torch"}
    assert len(calls) == 2  # 2 threads once, 1 thread once


@pytest.mark.parametrize("record", ["", "{not json", "[1, 2]", '{"2": "mkl"}'])
def test_a_damaged_record_is_measured_again(timed, tmp_path, record):
    (tmp_path / "products.json").write_text(record)
    calls = timed(1.0, 0.5)
    assert machine.products_choice(tmp_path, 2) == "brgemm" and len(calls) == 1
    assert json.loads((tmp_path / "products.json").read_text())["2"] == "brgemm"


def test_the_environment_forces_the_choice_and_a_bad_value_is_named(timed, tmp_path, monkeypatch):
    calls = timed(1.0, 0.5)
    monkeypatch.setenv(machine.PRODUCTS_ENV, "torch")
    assert machine.products_choice(tmp_path, 2) == "torch" and not calls
    monkeypatch.setenv(machine.PRODUCTS_ENV, "mkl")
    with pytest.raises(ValueError, match="DROPRNN_PRODUCTS expected one of torch, brgemm, got 'mkl'"):
        machine.products_choice(tmp_path, 2)


@pytest.mark.parametrize("second_key", ["a", "b"], ids=["same key", "another key"])
def test_processes_take_turns_on_a_record(tmp_path, second_key):
    """While one caller measures, another waits its turn: asking for the same key it reads the first one's
    choice instead of measuring (and perhaps choosing) again; asking for another key, both are kept."""
    import threading

    record = tmp_path / "shapes.json"
    measuring, results, second_measured = threading.Event(), {}, []

    def slow():
        measuring.set()
        time.sleep(0.3)
        return "torch"

    def fast():
        second_measured.append(1)
        return "brgemm"

    first = threading.Thread(target=lambda: results.update(a=machine.kept_choice(record, "a", slow, _BOTH)))
    second = threading.Thread(target=lambda: results.update(b=machine.kept_choice(record, second_key, fast, _BOTH)))
    first.start()
    assert measuring.wait(10)
    second.start()
    first.join(10)
    second.join(10)
    if second_key == "a":
        assert results == {"a": "torch", "b": "torch"} and not second_measured
        assert json.loads(record.read_text()) == {"a": "torch"}
    else:
        assert results == {"a": "torch", "b": "brgemm"}
        assert json.loads(record.read_text()) == {"a": "torch", "b": "brgemm"}


_BOTH = ("torch", "brgemm")


def test_a_measurement_may_keep_another_choice_in_the_same_record(tmp_path):
    record = tmp_path / "shapes.json"
    inner = lambda: machine.kept_choice(record, "inner", lambda: "brgemm", ("brgemm",))  # noqa: E731
    assert machine.kept_choice(record, "outer", lambda: inner() and "torch", ("torch",)) == "torch"
    assert json.loads(record.read_text()) == {"inner": "brgemm", "outer": "torch"}


def test_a_record_in_a_folder_that_cannot_be_written_still_gives_the_measurement(tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(path))
                        if str(path).endswith(".lock") else real_open(path, *a, **k))
    assert machine.kept_choice(tmp_path / "shapes.json", "k", lambda: "torch", ("torch",)) == "torch"


needs_fused = pytest.mark.skipif(not cpu.load(), reason="fused CPU kernels unavailable")


@needs_fused
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (64, 64, 64), (70, 130, 129), (3, 600, 65), (513, 17, 300)])
def test_float_mm_equals_the_float64_product(shape):
    M, K, N = shape
    gen = torch.Generator().manual_seed(M * K + N)
    a, b = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
    out = torch.full((M, N), float("nan"))
    torch.ops.droprnn_cpu.float_mm(a, b, out)
    want = a.double() @ b.double()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5 * K ** 0.5 * max(1.0, want.abs().max().item()))


@needs_fused
def test_float_mm_reads_column_blocks_and_writes_row_strided_outputs():
    """The projections pass one gate's columns of the kernel (rows with a gap) and write into a wider buffer."""
    a = torch.randn(9, 6)
    kernel = torch.randn(6, 4 * 5)
    out = torch.full((9, 12), float("nan"))
    torch.ops.droprnn_cpu.float_mm(a, kernel[:, 5:10], out[:, 2:7])
    torch.testing.assert_close(out[:, 2:7], a @ kernel[:, 5:10], rtol=1e-6, atol=1e-5)
    assert out[:, :2].isnan().all() and out[:, 7:].isnan().all()  # nothing written beside the block


@needs_fused
@pytest.mark.parametrize("bad, message", [
    (lambda: (torch.randn(3, 4), torch.randn(5, 6), torch.empty(3, 6)), r"b must have shape \(4, 6\)"),
    (lambda: (torch.randn(3, 4), torch.randn(4, 6), torch.empty(3, 5)), r"out must have shape \(3, 6\)"),
    (lambda: (torch.randn(3, 4), torch.randn(4, 6), torch.empty(3, 6, dtype=torch.float64)), "out must be a float32"),
    (lambda: (torch.randn(4, 3).t(), torch.randn(4, 6), torch.empty(3, 6)), "a must have a unit stride"),
    (lambda: (torch.randn(3, 4), torch.randn(4, 6), torch.empty(6).expand(3, 6)), "rows that do not overlap"),
    (lambda: (torch.randn(3), torch.randn(3, 6), torch.empty(1, 6)), "matrices"),
])
def test_float_mm_names_bad_arguments(bad, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.droprnn_cpu.float_mm(*bad())


@needs_fused
@pytest.mark.parametrize("choice", ["torch", "brgemm"])
def test_either_library_gives_the_same_layer(choice, monkeypatch):
    """The fused LSTM with each library for its input projections equals the reference loop, per-gate masks
    (one product per gate's columns) and tied ones (one product)."""
    from droprnn.kernels import fused

    monkeypatch.setitem(cpu._state, f"products-{torch.get_num_threads()}", choice)
    used = []
    monkeypatch.setattr(torch.ops.droprnn_cpu, "float_mm", _spy(torch.ops.droprnn_cpu.float_mm, used), raising=False)
    for inputs, recurrent in (("keras", "keras"), ("shared", "tied")):
        torch.manual_seed(0)
        layer = droprnn.LSTM(12, input_size=5, return_sequences=True, dropout=0.3, recurrent_dropout=0.2,
                             input_dropout_mode=inputs, recurrent_dropout_mode=recurrent)
        x = torch.randn(3, 7, 5, requires_grad=True)
        torch.manual_seed(1)
        y = layer(x)
        y.square().sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        x.grad = None
        layer.zero_grad()
        layer.impl = "reference"
        torch.manual_seed(1)
        want = layer(x)
        want.square().sum().backward()
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        for got, expected in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cpu.projection_products() == choice
    assert bool(used) == (choice == "brgemm")  # per-gate masks: one product per gate; tied: one


def _spy(function, calls):
    def spied(*args, **kwargs):
        calls.append(args[0].shape)
        return function(*args, **kwargs)

    return spied


@needs_fused
def test_this_machine_names_its_choices(monkeypatch):
    """What the benchmark prints beside its tables: the measured projection library and the bfloat16 engine
    (which agrees with whether bfloat16 products are available)."""
    monkeypatch.delenv(machine.PRODUCTS_ENV, raising=False)
    assert cpu.projection_products() in ("torch", "brgemm")
    engine = torch.ops.droprnn_cpu.bf16_engine()
    assert engine in ("brgemm", "avx512_bf16", "none")
    assert (engine != "none") == bool(torch.ops.droprnn_cpu.bf16_products())
