"""ImplicitRNN against nn.LSTM of about the same size on two generated tasks.

1. Spiky series: periodic spikes that decay exponentially, with a period,
   phase and height drawn per sequence, plus noise; predict the next value
   from the last 24 (the model has to find the period and the height).
2. Extrapolation: the rolling mean of the last 5 of 20 values. Training inputs
   are uniform in [-1, 1]; the test also uses [-4, 4], outside that range.

Prints test mean squared errors and parameter counts. CPU, about a minute.
Run: python examples/rnn_vs_lstm.py
"""
import time

import torch
from torch import nn

import idl

SEQ_SPIKY, SEQ_MEAN, WINDOW = 24, 20, 5
HIDDEN, LSTM_HIDDEN = 16, 15  # chosen so the parameter counts nearly match


class LSTMRegressor(nn.Module):
    def __init__(self, input_dim, output_dim, hidden_dim):
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, batch_first=True)
        self.linear = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.linear(h[-1])


def spiky_series(count, generator):
    """(count, SEQ_SPIKY, 1) windows and the value that follows each."""
    steps = torch.arange(SEQ_SPIKY + 1, dtype=torch.float32)
    period = torch.randint(4, 10, (count, 1), generator=generator).float()
    phase = torch.randint(0, 10, (count, 1), generator=generator).float()
    height = 0.5 + 1.5 * torch.rand(count, 1, generator=generator)
    since_spike = torch.remainder(steps + phase, period)  # 0 at a spike
    series = height * torch.exp(-1.5 * since_spike)
    series = series + 0.03 * torch.randn(series.shape, generator=generator)
    return series[:, :-1, None], series[:, -1:]


def rolling_mean(count, generator, scale):
    x = scale * (2 * torch.rand(count, SEQ_MEAN, 1, generator=generator) - 1)
    return x, x[:, -WINDOW:, 0].mean(dim=1, keepdim=True)


def train(model, x, y, steps, lr, batch=128, seed=0):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[index]), y[index]).backward()
        optimizer.step()
        schedule.step()
    return model


@torch.no_grad()
def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y).item()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def models():
    torch.manual_seed(0)
    implicit = idl.ImplicitRNN(
        input_dim=1, output_dim=1, hidden_dim=HIDDEN, implicit_hidden_dim=HIDDEN, bias=True
    )
    torch.manual_seed(0)
    return {"ImplicitRNN": implicit, "LSTM": LSTMRegressor(1, 1, LSTM_HIDDEN)}


def main(spiky_steps=800, mean_steps=400):
    # Tiny matrices: extra threads only add synchronisation (and stall badly
    # on a busy machine).
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    spiky_train, spiky_test = spiky_series(4000, generator), spiky_series(1000, generator)
    mean_train = rolling_mean(4000, generator, scale=1.0)
    mean_tests = {"[-1,1]": rolling_mean(1000, generator, 1.0), "[-4,4]": rolling_mean(1000, generator, 4.0)}

    rows = []
    for name, model in models().items():
        start = time.perf_counter()
        train(model, *spiky_train, spiky_steps, lr=1e-2)
        rows.append(("spiky next value", name, count_parameters(model), mse(model, *spiky_test), "",
                     time.perf_counter() - start))
    for name, model in models().items():
        start = time.perf_counter()
        train(model, *mean_train, mean_steps, lr=1e-2)
        errors = [mse(model, *test) for test in mean_tests.values()]
        rows.append(("rolling mean", name, count_parameters(model), *errors, time.perf_counter() - start))

    print(f"target variance: spiky {spiky_test[1].var().item():.4f}, "
          + ", ".join(f"rolling mean {k} {v[1].var().item():.4f}" for k, v in mean_tests.items()))
    print(f"{'task':<18}{'model':<13}{'params':>7}  {'test MSE':>10}  {'MSE [-4,4]':>10}  {'train s':>7}")
    for task, name, params, error, extra, seconds in rows:
        extra = f"{extra:10.5f}" if extra != "" else f"{'':10}"
        print(f"{task:<18}{name:<13}{params:>7}  {error:10.5f}  {extra}  {seconds:7.1f}")
    print("(rolling mean: 'test MSE' is on inputs in the training range [-1,1])")


if __name__ == "__main__":
    main()
