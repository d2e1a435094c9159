"""The sequence dropout layers (LockedDropout, TimestepDropout, EmbeddingDropout, WordDropout) and MC dropout
(mc_predict / mc_dropout_mode)."""

from __future__ import annotations

import copy as copy_module
import math

import pytest
import torch
from torch import nn

import droprnn
from droprnn.random import SeedStream, dropout_mask

F64 = torch.float64


def _sigma_check(kept: int, total: int, keep_prob: float) -> None:
    sigma = math.sqrt(total * keep_prob * (1 - keep_prob))
    assert abs(kept - total * keep_prob) < 5 * sigma, (kept, total, keep_prob)


# ----------------------------------------------------------------------------------------------------------
# LockedDropout
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 17])
def test_locked_equals_dropout_noise_shape_and_spatial(rate, seed):
    x = torch.randn(5, 7, 6, dtype=F64)
    locked = droprnn.LockedDropout(rate, seed=seed)
    drop = droprnn.Dropout(rate, noise_shape=(None, 1, None), seed=seed)
    spatial = droprnn.SpatialDropout1D(rate, seed=seed)
    for _ in range(3):  # draw for draw, not only the first call
        y = locked(x, training=True)
        assert torch.equal(y, drop(x, training=True))
        assert torch.equal(y, spatial(x, training=True))


def test_locked_mask_constant_over_time_differs_across_samples_and_features():
    x = torch.rand(16, 9, 12, dtype=F64) + 0.5  # strictly positive: zero <=> dropped
    y = droprnn.LockedDropout(0.5, seed=3)(x, training=True)
    keep = y != 0
    # the same mask at every timestep
    assert torch.equal(keep, keep[:, :1, :].expand_as(keep))
    # survivors scaled by 1/(1-p)
    torch.testing.assert_close(y[keep], (x / 0.5)[keep], rtol=0, atol=0)
    per_seq = keep[:, 0, :]  # (B, F)
    # differs across samples (rows of per_seq not all identical) and across features
    assert any(not torch.equal(per_seq[0], per_seq[b]) for b in range(1, per_seq.shape[0]))
    assert any(not torch.equal(per_seq[:, 0], per_seq[:, f]) for f in range(1, per_seq.shape[1]))
    _sigma_check(int(per_seq.sum()), per_seq.numel(), 0.5)


@pytest.mark.parametrize("cls", [droprnn.LockedDropout, droprnn.TimestepDropout])
def test_sequence_dropouts_eval_identity(cls):
    x = torch.randn(3, 4, 5)
    layer = cls(0.7, seed=1)
    layer.eval()
    assert layer(x) is x or torch.equal(layer(x), x)
    assert torch.equal(layer(x, training=False), x)
    layer.train()
    assert not torch.equal(layer(x), x)  # training=None follows .train()


@pytest.mark.parametrize("cls", [droprnn.LockedDropout, droprnn.TimestepDropout])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5), (6,)])
@pytest.mark.parametrize("training", [True, False])
def test_sequence_dropouts_require_3d(cls, shape, training):
    layer = cls(0.5)
    with pytest.raises(droprnn.DroprnnError, match=r"(?s)%s.*inputs.*\(batch, time, features\).*shape" % cls.__name__):
        layer(torch.randn(*shape), training=training)


@pytest.mark.parametrize("cls", [droprnn.LockedDropout, droprnn.TimestepDropout])
@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True, None])
def test_sequence_dropouts_bad_rate(cls, bad):
    with pytest.raises(droprnn.DroprnnError, match="rate"):
        cls(bad)


@pytest.mark.parametrize("cls", [droprnn.LockedDropout, droprnn.TimestepDropout])
def test_sequence_dropouts_rate_zero_and_one(cls):
    x = torch.randn(2, 3, 4)
    assert torch.equal(cls(0.0)(x, training=True), x)
    assert torch.equal(cls(1.0)(x, training=True), torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------------------
# TimestepDropout
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_timestep_dropout_drops_whole_timesteps(rate):
    x = torch.rand(20, 30, 4, dtype=F64) + 0.5
    y = droprnn.TimestepDropout(rate, seed=5)(x, training=True)
    keep = y != 0
    # every feature of a timestep shares the decision
    assert torch.equal(keep, keep[..., :1].expand_as(keep))
    torch.testing.assert_close(y[keep], (x / (1 - rate))[keep], rtol=0, atol=0)
    step_keep = keep[..., 0]  # (B, T)
    # per sample: the dropped steps differ between sequences
    assert any(not torch.equal(step_keep[0], step_keep[b]) for b in range(1, step_keep.shape[0]))
    # and not all steps of one sample share it
    assert bool((step_keep.any(1) & ~step_keep.all(1)).any())
    _sigma_check(int(step_keep.sum()), step_keep.numel(), 1 - rate)


@pytest.mark.parametrize("seed", [0, 99])
def test_timestep_equals_dropout_noise_shape(seed):
    x = torch.randn(4, 6, 3)
    a = droprnn.TimestepDropout(0.4, seed=seed)
    b = droprnn.Dropout(0.4, noise_shape=(None, None, 1), seed=seed)
    for _ in range(3):
        assert torch.equal(a(x, training=True), b(x, training=True))


@pytest.mark.parametrize("rate", [0.3, 0.6])
def test_locked_and_timestep_match_seeded_keras(rate):
    keras = pytest.importorskip("keras")
    import numpy as np

    x = np.random.default_rng(0).random((4, 6, 5)).astype("float32")
    pairs = [
        (keras.layers.SpatialDropout1D(rate, seed=7), droprnn.LockedDropout(rate, seed=7)),
        (keras.layers.Dropout(rate, noise_shape=(None, 1, None), seed=7), droprnn.LockedDropout(rate, seed=7)),
        (keras.layers.Dropout(rate, noise_shape=(None, None, 1), seed=7), droprnn.TimestepDropout(rate, seed=7)),
    ]
    for k, d in pairs:
        for _ in range(3):
            expected = k(x, training=True).detach().cpu().numpy()
            assert np.array_equal(d(torch.from_numpy(x), training=True).numpy(), expected)


def test_timestep_dropout_global_rng_follows_manual_seed():
    x = torch.randn(4, 6, 3)
    layer = droprnn.TimestepDropout(0.5)
    torch.manual_seed(7)
    y1 = layer(x, training=True)
    torch.manual_seed(7)
    assert torch.equal(y1, layer(x, training=True))
    assert not torch.equal(y1, layer(x, training=True))


# ----------------------------------------------------------------------------------------------------------
# EmbeddingDropout
# ----------------------------------------------------------------------------------------------------------
V, E = 12, 5


def _droprnn_embedding(mask_zero=False):
    return droprnn.Embedding(V, E, mask_zero=mask_zero, dtype=F64)


def _torch_embedding(padding_idx=None):
    return nn.Embedding(V, E, padding_idx=padding_idx, dtype=F64)


def _weight(emb):
    return emb.embeddings if isinstance(emb, droprnn.Embedding) else emb.weight


EMBEDDINGS = {
    "droprnn": lambda: _droprnn_embedding(),
    "droprnn_mask_zero": lambda: _droprnn_embedding(mask_zero=True),
    "torch": lambda: _torch_embedding(),
    "torch_padding": lambda: _torch_embedding(padding_idx=0),
}


def _ids(batch=6, steps=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (batch, steps), generator=g)
    ids[:, -2:] = 0  # some padding / id 0
    ids[0, 0] = ids[3, 4] = 7  # a repeated id across samples
    return ids


@pytest.mark.parametrize("kind", list(EMBEDDINGS))
@pytest.mark.parametrize("rate", [0.25, 0.5])
@pytest.mark.parametrize("seed", [1, 42])
def test_embedding_dropout_equals_masked_matrix_lookup(kind, rate, seed):
    emb = EMBEDDINGS[kind]()
    layer = droprnn.EmbeddingDropout(emb, rate, seed=seed)
    ids = _ids()
    y = layer(ids, training=True)
    assert y.shape == (*ids.shape, E)
    row_mask = dropout_mask((V,), rate, SeedStream(seed), F64, torch.device("cpu"))
    expected = torch.nn.functional.embedding(ids, _weight(emb) * row_mask[:, None])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)
    # the un-dropped output scaled per row: exactly 0 or exactly 1/(1-p) times the plain lookup
    plain = emb(ids)
    factor = row_mask[ids].unsqueeze(-1)
    assert torch.equal(y, plain * factor)
    assert set(row_mask.unique().tolist()) <= {0.0, 1.0 / (1 - rate)}


@pytest.mark.parametrize("kind", list(EMBEDDINGS))
def test_embedding_dropout_word_types_shared_across_batch(kind):
    torch.manual_seed(0)
    emb = EMBEDDINGS[kind]()
    with torch.no_grad():  # strictly positive rows (keep row 0 of a padding_idx embedding zero)
        w = _weight(emb)
        w.copy_(torch.rand_like(w) + 0.5)
        if kind == "torch_padding":
            w[0].zero_()
    layer = droprnn.EmbeddingDropout(emb, 0.5)  # global RNG
    ids = torch.randint(0, V, (16, 10))
    seen_dropped = seen_kept = False
    for _ in range(5):
        y = layer(ids, training=True)
        plain = emb(ids)
        for v in ids.unique().tolist():
            where = ids == v
            rows = y[where]  # (n, E)
            if kind == "torch_padding" and v == 0:
                assert torch.equal(rows, torch.zeros_like(rows))
                continue
            # every occurrence of the id in the whole batch is treated identically
            assert torch.equal(rows, rows[:1].expand_as(rows))
            if bool((rows == 0).all()):
                seen_dropped = True
            else:
                seen_kept = True
                assert torch.equal(rows, plain[where] * 2.0)  # exactly 1/(1-p) = 2
    assert seen_dropped and seen_kept


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_embedding_dropout_exact_scale_float32(rate):
    emb = nn.Embedding(200, E)
    layer = droprnn.EmbeddingDropout(emb, rate, seed=3)
    ids = torch.arange(200).repeat(3, 1)
    y = layer(ids, training=True)
    plain = emb(ids)
    scale = torch.tensor(1.0 / (1 - rate), dtype=torch.float32)
    kept = (y != 0).any(-1)
    assert bool(kept.any()) and bool((~kept).any())
    assert torch.equal(y[kept], plain[kept] * scale)
    torch.testing.assert_close(y[kept], plain[kept] / (1 - rate))


@pytest.mark.parametrize("kind", ["droprnn", "torch", "torch_padding"])
def test_embedding_dropout_gradient_zero_for_dropped_rows(kind):
    emb = EMBEDDINGS[kind]()
    layer = droprnn.EmbeddingDropout(emb, 0.5, seed=11)
    ids = torch.arange(V).repeat(2, 1)  # every row used
    y = layer(ids, training=True)
    (y * torch.randn_like(y)).sum().backward()
    grad = _weight(emb).grad
    row_mask = dropout_mask((V,), 0.5, SeedStream(11), F64, torch.device("cpu"))
    dropped = row_mask == 0
    assert bool(dropped.any()) and bool((~dropped).any())
    assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped]))
    nonzero_rows = (grad != 0).any(-1)
    expected_nonzero = ~dropped
    if kind == "torch_padding":
        expected_nonzero[0] = False  # padding_idx row never gets a gradient
    assert torch.equal(nonzero_rows, expected_nonzero)


@pytest.mark.parametrize("kind", list(EMBEDDINGS))
def test_embedding_dropout_eval_identity(kind):
    emb = EMBEDDINGS[kind]()
    layer = droprnn.EmbeddingDropout(emb, 0.5, seed=0)
    ids = _ids()
    layer.eval()
    assert torch.equal(layer(ids), emb(ids))
    assert torch.equal(layer(ids, training=False), emb(ids))
    layer.train()
    assert not torch.equal(layer(ids), emb(ids))
    assert torch.equal(droprnn.EmbeddingDropout(emb, 0.0)(ids, training=True), emb(ids))


def test_embedding_dropout_seeded_reproducible_and_draws_advance():
    emb = _droprnn_embedding()
    ids = _ids()
    a, b = droprnn.EmbeddingDropout(emb, 0.5, seed=8), droprnn.EmbeddingDropout(emb, 0.5, seed=8)
    ya1, ya2 = a(ids, training=True), a(ids, training=True)
    assert torch.equal(ya1, b(ids, training=True))
    assert torch.equal(ya2, b(ids, training=True))
    assert not torch.equal(ya1, ya2)
    # the second draw is the stream's second generator
    stream = SeedStream(8)
    dropout_mask((V,), 0.5, stream, F64, torch.device("cpu"))
    second = dropout_mask((V,), 0.5, stream, F64, torch.device("cpu"))
    assert torch.equal(ya2, emb(ids) * second[ids].unsqueeze(-1))


def test_embedding_dropout_compute_mask_passthrough():
    ids = _ids()
    with_mask = droprnn.EmbeddingDropout(_droprnn_embedding(mask_zero=True), 0.3)
    assert torch.equal(with_mask.compute_mask(ids), ids != 0)
    without = droprnn.EmbeddingDropout(_droprnn_embedding(mask_zero=False), 0.3)
    assert without.compute_mask(ids) is None
    given = torch.ones(ids.shape, dtype=torch.bool)
    assert without.compute_mask(ids, given) is given
    torch_wrapped = droprnn.EmbeddingDropout(_torch_embedding(padding_idx=0), 0.3)
    assert torch_wrapped.compute_mask(ids) is None
    assert torch_wrapped.compute_mask(ids, given) is given


def test_embedding_dropout_keras_weights():
    emb = _droprnn_embedding()
    layer = droprnn.EmbeddingDropout(emb, 0.3)
    weights = layer.keras_weights()
    assert len(weights) == 1 and weights[0] is emb.embeddings
    assert droprnn.EmbeddingDropout(_torch_embedding(), 0.3).keras_weights() == []
    # the wrapped module is a registered submodule: its parameters train with the wrapper
    assert any(p is emb.embeddings for p in layer.parameters())


def test_embedding_dropout_in_sequential_with_lstm_respects_mask_zero():
    torch.manual_seed(0)
    emb = _droprnn_embedding(mask_zero=True)
    lstm = droprnn.LSTM(4, input_size=E, dtype=F64)
    model = droprnn.Sequential([droprnn.EmbeddingDropout(emb, 0.5, seed=2), lstm])
    ids = torch.randint(1, V, (3, 6))
    padded = torch.cat([ids, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    # eval: trailing padding is skipped, same result as the unpadded sequence
    model.eval()
    torch.testing.assert_close(model(padded), model(ids), rtol=0, atol=1e-12)
    # training: seeded, the same row mask for both calls -> padding still skipped
    model_a = droprnn.Sequential([droprnn.EmbeddingDropout(emb, 0.5, seed=2), lstm])
    model_b = droprnn.Sequential([droprnn.EmbeddingDropout(emb, 0.5, seed=2), lstm])
    ya, yb = model_a(padded, training=True), model_b(ids, training=True)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    # and equals an LSTM on the masked-matrix lookup
    row_mask = dropout_mask((V,), 0.5, SeedStream(2), F64, torch.device("cpu"))
    vectors = torch.nn.functional.embedding(ids, emb.embeddings * row_mask[:, None])
    torch.testing.assert_close(ya, lstm(vectors), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [None, 5, torch.zeros(3, 4), nn.Linear(3, 4), droprnn.Dense(3)])
def test_embedding_dropout_bad_embedding(bad):
    with pytest.raises(droprnn.DroprnnError, match=r"EmbeddingDropout.*`embedding`.*Embedding"):
        droprnn.EmbeddingDropout(bad, 0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.2, "0.1", True])
def test_embedding_dropout_bad_rate(bad):
    with pytest.raises(droprnn.DroprnnError, match="rate"):
        droprnn.EmbeddingDropout(_torch_embedding(), bad)


def test_embedding_dropout_bad_seed():
    with pytest.raises(droprnn.DroprnnError, match="seed"):
        droprnn.EmbeddingDropout(_torch_embedding(), 0.5, seed=1.5)


def _positive_embedding():
    emb = _torch_embedding()
    with torch.no_grad():
        emb.weight.copy_(torch.rand_like(emb.weight) + 0.5)
    return emb


def test_embedding_dropout_per_sequence_drops_each_rows_own_word_types():
    emb = _positive_embedding()
    layer = droprnn.EmbeddingDropout(emb, 0.5, seed=4, per_sequence=True)
    ids = torch.randint(0, V, (64, 30), generator=torch.Generator().manual_seed(0))
    y = layer(ids, training=True)
    factor = (y / emb(ids))[..., 0]  # 0 or 2 per position
    assert set(factor.unique().tolist()) == {0.0, 2.0}
    torch.testing.assert_close(y, emb(ids) * factor.unsqueeze(-1), rtol=0, atol=1e-15)
    differs_between_rows = False
    for word in range(V):
        at = ids == word
        for row in range(ids.shape[0]):
            assert factor[row][at[row]].unique().numel() <= 1, "every occurrence in a row shares its draw"
        per_row = [factor[row][at[row]][0].item() for row in range(ids.shape[0]) if at[row].any()]
        differs_between_rows |= len(set(per_row)) == 2
    assert differs_between_rows, "rows draw their own masks"
    pairs = [(row, word) for row in range(ids.shape[0]) for word in ids[row].unique().tolist()]
    kept = sum(factor[row][ids[row] == word][0].item() > 0 for row, word in pairs)
    _sigma_check(kept, len(pairs), 0.5)


def test_embedding_dropout_per_sequence_identical_rows_get_independent_masks():
    emb = _positive_embedding()
    layer = droprnn.EmbeddingDropout(emb, 0.5, seed=1, per_sequence=True)
    ids = torch.arange(V).repeat(8, 1)
    dropped = layer(ids, training=True)[..., 0] == 0
    assert len({tuple(row.tolist()) for row in dropped}) > 1
    shared = droprnn.EmbeddingDropout(emb, 0.5, seed=1)(ids, training=True)[..., 0] == 0
    assert len({tuple(row.tolist()) for row in shared}) == 1, "the default shares one draw across the batch"


def test_embedding_dropout_per_sequence_seeded_gradients_and_eval():
    emb = _droprnn_embedding()
    ids = _ids()
    a = droprnn.EmbeddingDropout(emb, 0.3, seed=5, per_sequence=True)
    b = droprnn.EmbeddingDropout(emb, 0.3, seed=5, per_sequence=True)
    assert torch.equal(a(ids, training=True), b(ids, training=True))
    assert torch.equal(a(ids, training=False), emb(ids))
    y = a(ids, training=True)
    y.sum().backward()  # the gradient flows through the kept positions only, scaled like them
    factor = (y.detach() / emb(ids).detach())[..., 0].nan_to_num(0.0)
    expected = torch.zeros_like(emb.embeddings).index_add_(0, ids.reshape(-1), factor.reshape(-1, 1).expand(-1, E))
    torch.testing.assert_close(emb.embeddings.grad, expected)
    assert "per_sequence=True" in repr(a) and "per_sequence" not in repr(droprnn.EmbeddingDropout(emb, 0.3))


def test_embedding_dropout_per_sequence_bad_input():
    with pytest.raises(droprnn.DroprnnError, match=r"EmbeddingDropout.*`per_sequence`.*True or False"):
        droprnn.EmbeddingDropout(_torch_embedding(), 0.5, per_sequence=1)
    layer = droprnn.EmbeddingDropout(_torch_embedding(), 0.5, per_sequence=True)
    with pytest.raises(droprnn.DroprnnError, match=r"EmbeddingDropout.*batch dimension"):
        layer(torch.tensor(3), training=True)


# ----------------------------------------------------------------------------------------------------------
# WordDropout
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_word_dropout_rejects_non_integer_input(dtype):
    layer = droprnn.WordDropout(0.3)
    with pytest.raises(droprnn.DroprnnError, match=r"WordDropout.*integer.*TimestepDropout"):
        layer(torch.ones(2, 3, dtype=dtype), training=True)
    with pytest.raises(droprnn.DroprnnError, match="TimestepDropout"):
        layer(torch.ones(2, 3, dtype=dtype), training=False)


@pytest.mark.parametrize("replacement_id", [0, 1, 99])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_word_dropout_replaces_tokens(replacement_id, dtype):
    ids = torch.randint(2, 50, (8, 12)).to(dtype)  # never equal to 0/1; 99 out of range of the ids
    y = droprnn.WordDropout(0.4, replacement_id=replacement_id, seed=3)(ids, training=True)
    assert y.dtype == dtype and y.shape == ids.shape
    replaced = y != ids
    assert bool(replaced.any()) and bool((~replaced).any())
    assert bool((y[replaced] == replacement_id).all())
    assert torch.equal(y[~replaced], ids[~replaced])


def test_word_dropout_per_sample_independent_and_rate():
    rate = 0.3
    ids = torch.arange(1, 41).repeat(200, 1)  # identical rows
    y = droprnn.WordDropout(rate, replacement_id=0, seed=5)(ids, training=True)
    dropped = y == 0
    # identical samples get different drops (per sample, not shared across the batch)
    assert len({tuple(r.tolist()) for r in dropped}) > 150
    # and per token: the same id in different positions of one sample is not tied
    assert not torch.equal(dropped[:, 0], dropped[:, 1])
    _sigma_check(int((~dropped).sum()), dropped.numel(), 1 - rate)
    # per column and per row rates are also roughly 1 - rate
    col = (~dropped).float().mean(0)
    assert float(col.min()) > 1 - rate - 0.15 and float(col.max()) < 1 - rate + 0.15


def test_word_dropout_eval_identity_and_seeded():
    ids = torch.randint(1, 30, (4, 9))
    layer = droprnn.WordDropout(0.5, seed=1)
    layer.eval()
    assert torch.equal(layer(ids), ids)
    assert torch.equal(droprnn.WordDropout(0.0)(ids, training=True), ids)
    a, b = droprnn.WordDropout(0.5, seed=10), droprnn.WordDropout(0.5, seed=10)
    ya = [a(ids, training=True) for _ in range(3)]
    yb = [b(ids, training=True) for _ in range(3)]
    for p, q in zip(ya, yb):
        assert torch.equal(p, q)
    assert not torch.equal(ya[0], ya[1])
    assert not torch.equal(ya[0], droprnn.WordDropout(0.5, seed=11)(ids, training=True))
    layer.train()
    assert not torch.equal(layer(ids), ids)


def test_word_dropout_accepts_python_lists():
    y = droprnn.WordDropout(0.5, seed=0)([[3, 4, 5], [6, 7, 8]], training=True)
    assert torch.is_tensor(y) and y.shape == (2, 3) and not y.is_floating_point()


@pytest.mark.parametrize("bad", [-1, 1.0, "0", None, True])
def test_word_dropout_bad_replacement_id(bad):
    with pytest.raises(droprnn.DroprnnError, match=r"WordDropout.*replacement_id.*int >= 0"):
        droprnn.WordDropout(0.2, replacement_id=bad)


@pytest.mark.parametrize("bad", [-0.5, 2, "0.1", None])
def test_word_dropout_bad_rate(bad):
    with pytest.raises(droprnn.DroprnnError, match="rate"):
        droprnn.WordDropout(bad)


def test_word_dropout_then_embedding_mask_zero_skips_dropped_tokens():
    """replacement_id 0 + Embedding(mask_zero) makes the dropped tokens padding: skipped steps."""
    torch.manual_seed(0)
    emb = _droprnn_embedding(mask_zero=True)
    lstm = droprnn.LSTM(3, input_size=E, dtype=F64)
    model = droprnn.Sequential([droprnn.WordDropout(0.4, seed=4), emb, lstm])
    ids = torch.randint(1, V, (5, 7))
    y = model(ids, training=True)
    dropped = droprnn.WordDropout(0.4, seed=4)(ids, training=True)
    assert bool((dropped == 0).any())
    expected = lstm(emb(dropped), mask=dropped != 0)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# MC dropout
# ----------------------------------------------------------------------------------------------------------
B, T, D = 4, 5, 3


class Mixed(nn.Module):
    """A plain torch module (forward without a training kwarg) mixing BatchNorm, torch and droprnn dropout."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(D, dtype=F64)
        self.lstm = droprnn.LSTM(6, dropout=0.2, recurrent_dropout=0.3, return_sequences=True, input_size=D, dtype=F64)
        self.drop = droprnn.Dropout(0.3)
        self.torch_drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 2, dtype=F64)
        self.calls = 0

    def forward(self, x, lengths=None):
        self.calls += 1
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        y = self.lstm(x, lengths=lengths)
        y = self.torch_drop(self.drop(y))
        return self.head(y[:, -1])


def _trained_mixed():
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # non-trivial running stats
        model.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=F64))
        model.bn.running_var.copy_(torch.tensor([2.0, 0.5, 3.0], dtype=F64))
    return model


def _flags(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("initially_train", [True, False])
def test_mc_dropout_mode_flags_and_restore(initially_train):
    model = _trained_mixed()
    model.train(initially_train)
    model.lstm.cell.eval()  # a deliberately mixed state must be restored exactly
    before = _flags(model)
    with droprnn.mc_dropout_mode(model) as m:
        assert m is model
        assert not model.bn.training
        assert model.drop.training and model.torch_drop.training and model.lstm.training
        assert not model.head.training  # a plain Linear: inference mode
    assert _flags(model) == before


def test_mc_dropout_mode_restores_flags_when_model_raises():
    model = _trained_mixed()
    model.train()
    model.bn.eval()
    before = _flags(model)
    bad_lengths = torch.tensor([1, 2])  # batch of 4: the LSTM raises after BatchNorm ran
    with pytest.raises(droprnn.DroprnnError, match="lengths"):
        with droprnn.mc_dropout_mode(model):
            assert not model.bn.training
            model(torch.randn(B, T, D, dtype=F64), lengths=bad_lengths)
    assert _flags(model) == before
    # mc_predict too
    with pytest.raises(droprnn.DroprnnError, match="lengths"):
        droprnn.mc_predict(model, torch.randn(B, T, D, dtype=F64), samples=3, lengths=bad_lengths)
    assert _flags(model) == before
    # an exception raised by the caller's own code inside the block restores the flags as well
    with pytest.raises(KeyError):
        with droprnn.mc_dropout_mode(model):
            raise KeyError("boom")
    assert _flags(model) == before


@pytest.mark.parametrize("initially_train", [True, False])
def test_mc_predict_batchnorm_stays_eval(initially_train):
    model = _trained_mixed()
    model.train(initially_train)
    stats = [t.clone() for t in (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)]
    x = torch.randn(B, T, D, dtype=F64) * 3 + 1
    mean, std, samples = droprnn.mc_predict(model, x, samples=5, return_samples=True)
    for before, after in zip(stats, (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)):
        assert torch.equal(before, after)
    assert model.calls == 5
    # the output used the running stats: with all dropout off the model is deterministic and equal to eval
    model.eval()
    for m in (model.lstm, model.drop, model.torch_drop):
        m.eval()
    reference = model(x)
    # the dropout-free model with training-mode BatchNorm would differ (batch stats != running stats)
    copy = copy_module.deepcopy(model)
    copy.bn.train()
    assert not torch.allclose(reference, copy(x))
    # with every dropout rate 0 the MC passes all equal the eval output
    model.lstm.cell.dropout = model.lstm.cell.recurrent_dropout = 0.0
    model.drop.rate = 0.0
    model.torch_drop.p = 0.0
    mean0, std0 = droprnn.mc_predict(model, x, samples=3)
    torch.testing.assert_close(mean0, reference, rtol=0, atol=1e-12)
    assert torch.equal(std0, torch.zeros_like(std0))
    assert samples.shape == (5, B, 2)


def test_mc_predict_shapes_spread_and_return_samples():
    model = _trained_mixed()
    x = torch.randn(B, T, D, dtype=F64)
    mean, std = droprnn.mc_predict(model, x, samples=8)
    assert mean.shape == std.shape == (B, 2)
    assert bool((std > 0).all())
    mean2, std2, samples = droprnn.mc_predict(model, x, samples=6, return_samples=True)
    assert samples.shape == (6, B, 2)
    torch.testing.assert_close(mean2, samples.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(std2, samples.std(0, correction=0), rtol=0, atol=0)
    # population std, not the sample std
    assert not torch.allclose(std2, samples.std(0, correction=1))
    # passes differ from each other
    assert not torch.equal(samples[0], samples[1])


def test_mc_predict_no_grad():
    model = _trained_mixed()
    x = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    mean, std, samples = droprnn.mc_predict(model, x, samples=3, return_samples=True)
    assert not mean.requires_grad and not std.requires_grad and not samples.requires_grad
    assert torch.is_grad_enabled()


def test_mc_predict_without_dropout_has_zero_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 4, dtype=F64), nn.BatchNorm1d(4, dtype=F64), nn.Linear(4, 1, dtype=F64))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    x = torch.randn(B, D, dtype=F64)
    mean, std = droprnn.mc_predict(model, x, samples=4)
    assert torch.equal(std, torch.zeros_like(std))
    model.eval()
    torch.testing.assert_close(mean, model(x), rtol=0, atol=1e-12)
    # a droprnn model without any dropout rate too
    seq = droprnn.Sequential([droprnn.GRU(3, input_size=D, dtype=F64), droprnn.Dense(1, dtype=F64)])
    _, std = droprnn.mc_predict(seq, torch.randn(B, T, D, dtype=F64), samples=3)
    assert torch.equal(std, torch.zeros_like(std))


@pytest.mark.parametrize("bad", [1, 0, -2, 2.5, True])
def test_mc_predict_bad_samples(bad):
    model = _trained_mixed()
    before = _flags(model)
    with pytest.raises(droprnn.DroprnnError, match="samples"):
        droprnn.mc_predict(model, torch.randn(B, T, D, dtype=F64), samples=bad)
    assert _flags(model) == before and model.calls == 0


@pytest.mark.parametrize("per_call", [2, 3, 5])
def test_mc_predict_passes_per_call_are_copies_of_the_batch(per_call):
    """Passes run as copies of the batch: each is the model on x, lengths repeated with the rows, cut back out
    of one call (the same draws as that call made), in calls of ``per_call`` passes and a last smaller one."""
    model = _trained_mixed()
    x = torch.randn(B, T, D, dtype=F64)
    lengths = torch.tensor([5, 3, 2, 4])
    torch.manual_seed(3)
    mean, std, samples = droprnn.mc_predict(model, x, samples=5, return_samples=True, passes_per_call=per_call,
                                            lengths=lengths)
    assert samples.shape == (5, B, 2) and model.calls == -(-5 // per_call)
    torch.manual_seed(3)
    expected = []
    with torch.no_grad(), droprnn.mc_dropout_mode(model):
        while len(expected) < 5:
            copies = min(per_call, 5 - len(expected))
            expected += model(torch.cat([x] * copies), lengths=torch.cat([lengths] * copies)).chunk(copies)
    torch.testing.assert_close(samples, torch.stack(expected), rtol=0, atol=0)
    torch.testing.assert_close(mean, samples.mean(0), rtol=0, atol=0)
    torch.testing.assert_close(std, samples.std(0, correction=0), rtol=0, atol=0)
    assert all(not torch.equal(samples[i], samples[i + 1]) for i in range(4))  # every copy its own masks


def test_mc_predict_passes_per_call_without_dropout_equal_eval_and_take_masks_and_batch_axis():
    torch.manual_seed(0)
    layer = droprnn.LSTM(4, input_size=D, dtype=F64)
    x = torch.randn(B, T, D, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * B, dtype=torch.bool)
    mean, std = droprnn.mc_predict(layer, x, samples=6, passes_per_call=4, mask=mask)
    torch.testing.assert_close(mean, layer(x, mask=mask, training=False), rtol=0, atol=1e-12)
    assert float(std.max()) < 1e-12
    # a torch-style module, time first: the batch is axis 1 of the input and of the output
    torch_style = droprnn.nn.GRU(D, 3, input_dropout=0.3, recurrent_dropout=0.3, dtype=F64)

    class Sequences(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch_style

        def forward(self, x):
            return self.rnn(x)[0]

    _, _, samples = droprnn.mc_predict(Sequences(), x.transpose(0, 1), samples=4, return_samples=True,
                                       passes_per_call=4, batch_axis=1)
    assert samples.shape == (4, T, B, 3) and not torch.equal(samples[0], samples[1])
    # copies along its time axis would be one long sequence: a time-first module needs the axis said
    with pytest.raises(droprnn.DroprnnError, match=r"batch_axis.*droprnn.nn.GRU takes time-first input"):
        droprnn.mc_predict(Sequences(), x.transpose(0, 1), samples=4, passes_per_call=4)


NOT_INDEPENDENT_ROWS = {
    "dropconnect": lambda: droprnn.LSTM(4, recurrent_dropout=0.3, recurrent_dropout_mode="weights", input_size=D),
    "noise-shape": lambda: droprnn.Sequential([droprnn.Dropout(0.3, noise_shape=(1, None, None)),
                                               droprnn.GRU(4, input_size=D)]),
    "torch-style-dropconnect": lambda: droprnn.nn.LSTM(D, 4, batch_first=True, recurrent_dropout=0.3,
                                                       recurrent_dropout_mode="weights"),
    "stateful": lambda: droprnn.LSTM(4, dropout=0.3, stateful=True, input_size=D),
}


@pytest.mark.parametrize("case", NOT_INDEPENDENT_ROWS)
def test_mc_predict_passes_per_call_refuses_rows_that_are_not_independent(case):
    model = NOT_INDEPENDENT_ROWS[case]()
    reason = "stateful" if case == "stateful" else "one mask for the whole batch"
    with pytest.raises(droprnn.DroprnnError, match=f"passes_per_call > 1 needs independent batch rows.*{reason}"):
        droprnn.mc_predict(model, torch.randn(B, T, D), samples=4, passes_per_call=2)
    assert model.training  # refused before any flag was switched


@pytest.mark.parametrize("kwargs, match", [
    (dict(passes_per_call=0), "passes_per_call"),
    (dict(passes_per_call=2, batch_axis=3), "batch_axis"),
    (dict(passes_per_call=2, initial_state=[torch.zeros(B, 6, dtype=F64)] * 2), "initial_state"),
])
def test_mc_predict_passes_per_call_bad_arguments(kwargs, match):
    model = _trained_mixed()
    with pytest.raises(droprnn.DroprnnError, match=match):
        droprnn.mc_predict(model, torch.randn(B, T, D, dtype=F64), samples=3, **kwargs)
    assert model.calls == 0
    with pytest.raises(droprnn.DroprnnError, match="`x` expected a tensor"):
        droprnn.mc_predict(model, [torch.randn(B, T, D, dtype=F64)], samples=3, passes_per_call=2)


def test_mc_predict_passes_per_call_output_without_the_rows_raises():
    class Pooled(nn.Module):  # averages over the batch: its output has no batch axis to cut
        def __init__(self):
            super().__init__()
            self.lstm = droprnn.LSTM(3, dropout=0.2, input_size=D)

        def forward(self, x):
            return self.lstm(x).mean(0)

    with pytest.raises(droprnn.DroprnnError, match="axis 0 must hold the passes' 2 × 4 rows"):
        droprnn.mc_predict(Pooled(), torch.randn(B, T, D), samples=2, passes_per_call=2)


def test_mc_predict_tuple_output_raises():
    lstm = droprnn.LSTM(3, dropout=0.2, return_state=True, input_size=D)
    with pytest.raises(droprnn.DroprnnError, match="one tensor"):
        droprnn.mc_predict(lstm, torch.randn(B, T, D), samples=2)


def test_mc_predict_with_call_kwargs_lengths():
    model = _trained_mixed()
    x = torch.randn(B, T, D, dtype=F64)
    lengths = torch.tensor([5, 3, 2, 4])
    _, _, samples = droprnn.mc_predict(model, x, samples=4, return_samples=True, lengths=lengths)
    # lengths reached the LSTM: changing padded steps does not change any pass (seeded via global RNG)
    x2 = x.clone()
    x2[1, 3:] = 100.0
    x2[2, 2:] = -50.0
    torch.manual_seed(1)
    _, _, s1 = droprnn.mc_predict(model, x, samples=3, return_samples=True, lengths=lengths)
    torch.manual_seed(1)
    _, _, s2 = droprnn.mc_predict(model, x2, samples=3, return_samples=True, lengths=lengths)
    # BatchNorm (eval) is per-position and the head reads y[:, -1], which an RNN with lengths holds at the
    # last valid step's output; padded inputs must not leak in
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-12)
    assert samples.shape == (4, B, 2)


def test_mc_predict_on_droprnn_sequential_with_lengths():
    torch.manual_seed(0)
    model = droprnn.Sequential([
        droprnn.LSTM(5, dropout=0.2, recurrent_dropout=0.2, input_size=D, dtype=F64),
        droprnn.Dropout(0.3),
        droprnn.Dense(1, dtype=F64),
    ])
    model.eval()
    x = torch.randn(B, T, D, dtype=F64)
    lengths = torch.tensor([5, 1, 3, 2])
    mean, std = droprnn.mc_predict(model, x, samples=6, lengths=lengths)
    assert mean.shape == std.shape == (B, 1)
    assert bool((std > 0).all())
    assert not any(m.training for m in model.modules())


def test_mc_predict_on_bidirectional_and_torch_lstm():
    torch.manual_seed(0)
    bidi = droprnn.Bidirectional(droprnn.GRU(3, recurrent_dropout=0.4, input_size=D, dtype=F64))
    bidi.eval()
    mean, std = droprnn.mc_predict(bidi, torch.randn(B, T, D, dtype=F64), samples=4)
    assert mean.shape == (B, 6) and bool((std > 0).all())

    class TorchLSTMModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(D, 4, num_layers=2, dropout=0.5, batch_first=True, dtype=F64)

        def forward(self, x):
            return self.rnn(x)[0]

    m = TorchLSTMModel().eval()
    _, std = droprnn.mc_predict(m, torch.randn(B, T, D, dtype=F64), samples=3)
    assert bool((std > 0).any())  # torch's between-layer dropout is active too
    assert not m.rnn.training


def test_sequential_passes_training_none_down():
    x = torch.randn(B, T, D, dtype=F64)
    drop_a, drop_b = droprnn.Dropout(0.5), droprnn.Dropout(0.5)
    seq = droprnn.Sequential([drop_a, drop_b])
    seq.train()
    drop_a.eval()
    drop_b.eval()
    assert torch.equal(seq(x), x)  # the container's flag does not override its children's
    seq.eval()
    drop_b.train()
    y = seq(x)
    assert not torch.equal(y, x)
    assert bool(((y == 0) | torch.isclose(y, 2 * x)).all())
    # an explicit training flag still forces all
    seq.train()
    drop_b.eval()
    assert not torch.equal(seq(x, training=True), x)
    assert torch.equal(seq(x, training=False), x)


def test_bidirectional_passes_training_none_down():
    torch.manual_seed(0)
    x = torch.randn(B, T, D, dtype=F64)
    bidi = droprnn.Bidirectional(droprnn.LSTM(3, recurrent_dropout=0.5, input_size=D, dtype=F64))
    bidi.eval()
    bidi.forward_layer.train()
    y1, y2 = bidi(x), bidi(x)
    assert not torch.equal(y1[:, :3], y2[:, :3])  # forward copy follows its own flag (train)
    assert torch.equal(y1[:, 3:], y2[:, 3:])  # backward copy follows its own (eval)
    bidi.forward_layer.eval()
    assert torch.equal(bidi(x), bidi(x))


def test_reprs_name_rates():
    assert "rate=0.3" in repr(droprnn.LockedDropout(0.3))
    assert "rate=0.2" in repr(droprnn.TimestepDropout(0.2))
    r = repr(droprnn.EmbeddingDropout(_torch_embedding(), 0.4, name="emb_drop"))
    assert "rate=0.4" in r and "emb_drop" in r and "Embedding(" in r
    r = repr(droprnn.WordDropout(0.1, replacement_id=3))
    assert "rate=0.1" in r and "replacement_id=3" in r
