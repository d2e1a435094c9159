"""Keras users' question in milliseconds: a Keras model with recurrent dropout, trained with ``model.fit``.

One run prints, per (batch, time, input, units) shape and layer, the median milliseconds of a training step
of ``Sequential([Input, <layer>(units, dropout=0.25, recurrent_dropout=0.25), Dense(1)])`` under
``model.fit`` (Keras 3 on its torch backend, Adam, mean squared error), with:

- ``keras``            Keras's own layer (``keras.layers.LSTM`` / ``GRU``): with recurrent dropout it runs its
                       cell step by step;
- ``droprnn.keras``    the same model with ``droprnn.keras.LSTM`` / ``GRU`` (droprnn's kernels, Keras's masks);
- ``droprnn (torch)``  droprnn's PyTorch layer and a ``torch.nn.Linear`` in a plain PyTorch training loop (Adam,
                       MSE): what the layer costs without Keras around it;

and the ratios ``keras / droprnn.keras`` (how much faster the swap makes the model) and ``droprnn.keras /
droprnn (torch)`` (what Keras's own machinery adds).

    python benchmarks/keras_speed.py                    # the four shapes of rnn_speed.py, LSTM and GRU
    python benchmarks/keras_speed.py --shapes 32,100,64,128 --layers LSTM --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

SHAPES = [(32, 100, 64, 128), (64, 100, 128, 256), (16, 200, 32, 64), (128, 50, 256, 512)]
RATE = 0.25


def keras_step_ms(layer_class, shape, steps: int) -> float:
    """Median ms of one ``model.fit`` step (a batch per step; the first epoch, which builds, not counted)."""
    import keras
    import numpy as np

    batch, time_steps, features, units = shape
    model = keras.Sequential([keras.Input((time_steps, features)),
                              layer_class(units, dropout=RATE, recurrent_dropout=RATE), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, time_steps, features)).astype("float32")
    y = rng.standard_normal((batch, 1)).astype("float32")
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch_index, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch_index, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(x, y, batch_size=batch, epochs=2, verbose=0)  # warm up: build, kernels, allocator
    times.clear()
    model.fit(x, y, batch_size=batch, epochs=steps, verbose=0, callbacks=[Timer()])
    return statistics.median(times) * 1e3


def torch_step_ms(kind: str, shape, steps: int) -> float:
    """Median ms of one plain PyTorch training step with droprnn's layer."""
    import torch

    import droprnn

    batch, time_steps, features, units = shape
    layer = getattr(droprnn, kind)(units, dropout=RATE, recurrent_dropout=RATE, input_size=features)
    head = torch.nn.Linear(units, 1)
    optimizer = torch.optim.Adam([*layer.parameters(), *head.parameters()])
    x, y = torch.randn(batch, time_steps, features), torch.randn(batch, 1)

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(head(layer(x, training=True)), y)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7, help="timed training steps per row")
    parser.add_argument("--shapes", help="B,T,D,U shapes separated by ';' instead of rnn_speed.py's four")
    parser.add_argument("--layers", default="LSTM,GRU", help="comma-separated, of LSTM and GRU")
    args = parser.parse_args()

    import keras
    import torch

    import droprnn.keras as droprnn_keras
    from droprnn.kernels.cpu import machine

    torch.set_num_threads(args.threads)
    shapes = ([tuple(int(n) for n in part.split(",")) for part in args.shapes.split(";")] if args.shapes
              else SHAPES)
    print(f"machine: {machine.describe()}, torch {torch.__version__}, Keras {keras.__version__} "
          f"({keras.backend.backend()}), {args.threads} threads")
    header = (f"{'layer':5} {'shape (B,T,D,U)':20} {'keras':>9} {'droprnn.keras':>14} {'droprnn (torch)':>16} "
              f"{'keras/ours':>11} {'ours/torch':>11}")
    print(f"{header}\n{'-' * len(header)}")
    for kind in args.layers.split(","):
        for shape in shapes:
            theirs = keras_step_ms(getattr(keras.layers, kind), shape, args.steps)
            ours = keras_step_ms(getattr(droprnn_keras, kind), shape, args.steps)
            plain = torch_step_ms(kind, shape, args.steps)
            print(f"{kind:5} {str(shape):20} {theirs:9.1f} {ours:14.1f} {plain:16.1f} {theirs / ours:10.1f}× "
                  f"{ours / plain:10.2f}×", flush=True)


if __name__ == "__main__":
    main()
