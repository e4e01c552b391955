"""ImplicitRNN and ImplicitMultiHeadAttention against PyTorch's own sequence
modules: quality and milliseconds per training step, in one run.

1. Time series (statsmodels' bundled sunspots and El Niño; `pip install
   idl[bench]`): predict the next value from a window (20 yearly sunspot
   numbers, 24 monthly El Niño temperatures), standardised, chronological
   80/20 split. ImplicitRNN against nn.LSTM and nn.GRU of about the same
   parameter count; Adam, batch 32, test MSE (standardised units) averaged
   over seeds.
2. Character-level GPT on text that ships with Python (the source of a few
   stdlib modules): 2 pre-norm blocks, n_embd 64, 4 heads, block 64, batch
   32; the attention is causal SDPA or ImplicitMultiHeadAttention
   (feedback="values" and "full"). Validation loss on fixed batches.

Times are medians per optimizer step (forward, backward, step), one thread
unless --threads; the models of a task take their steps in turn, so a
changing machine load slows them alike. Iterations are the solves' (forward/backward) at the last step
and the most seen. Run from the repository root: PYTHONPATH=. python benchmarks/bench_sequence.py [--quick]
"""
import argparse
import math
import os
import sys
import sysconfig
import time
import warnings

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if any(name.startswith("_C") for name in os.listdir(os.path.join(_ROOT, "idl"))):
    sys.path.insert(0, _ROOT)  # this checkout's idl when it is built in place, not an installed one
import idl  # noqa: E402


# ---- 1. time series ---------------------------------------------------------------


def load_series(name):
    import statsmodels.api as sm

    if name == "sunspots":
        values = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
        window = 20
    else:
        data = sm.datasets.elnino.load_pandas().data
        values = data.drop(columns="YEAR").to_numpy().reshape(-1)
        window = 24
    series = torch.tensor(values, dtype=torch.float32)
    split = int(0.8 * len(series))
    mean, std = series[:split].mean(), series[:split].std()
    series = (series - mean) / std
    xs = torch.stack([series[i : i + window] for i in range(len(series) - window)]).unsqueeze(-1)
    ys = series[window:].unsqueeze(-1)
    cut = split - window
    return (xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])


class Recurrent(nn.Module):
    """nn.LSTM / nn.GRU and a linear readout of the last hidden state."""

    def __init__(self, kind, hidden):
        super().__init__()
        self.rnn = kind(1, hidden, batch_first=True)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.linear(out[:, -1])


def count(model):
    return sum(p.numel() for p in model.parameters())


def matched_size(kind, target):
    return min(range(2, 64), key=lambda h: abs(count(Recurrent(kind, h)) - target))


def series_models(hidden, implicit_hidden):
    implicit = idl.ImplicitRNN(input_dim=1, output_dim=1, hidden_dim=hidden, implicit_hidden_dim=implicit_hidden)
    target = count(implicit)
    return {
        "ImplicitRNN": implicit,
        "nn.LSTM": Recurrent(nn.LSTM, matched_size(nn.LSTM, target)),
        "nn.GRU": Recurrent(nn.GRU, matched_size(nn.GRU, target)),
    }


def run_series(name, steps, seeds, hidden, implicit_hidden, lr=1e-2, batch=32):
    train, test = load_series(name)
    rows = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        runs = {label: dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                            generator=torch.Generator().manual_seed(seed), times=[])
                for label, model in series_models(hidden, implicit_hidden).items()}
        for _ in range(steps):  # in turn: a changing load slows every model alike
            for run in runs.values():
                model = run["model"]
                index = torch.randint(0, len(train[0]), (batch,), generator=run["generator"])
                start = time.perf_counter()
                loss = nn.functional.mse_loss(model(train[0][index]), train[1][index])
                run["optimizer"].zero_grad()
                loss.backward()
                run["optimizer"].step()
                run["times"].append(time.perf_counter() - start)
        for label, run in runs.items():
            model, times = run["model"], run["times"]
            stats = getattr(model, "last_stats", None)  # the last training step's solves
            iters = "" if stats is None else f"{stats.forward['iterations']}/{stats.backward['iterations']}"
            with torch.no_grad():
                mse = nn.functional.mse_loss(model(test[0]), test[1]).item()
            row = rows.setdefault(label, {"mse": [], "ms": [], "params": count(model), "iters": ""})
            row["mse"].append(mse)
            row["ms"].append(1e3 * sorted(times)[len(times) // 2])
            row["iters"] = iters
    return rows


# ---- 2. character-level GPT ---------------------------------------------------------------


def stdlib_text(limit=400_000):
    folder = sysconfig.get_paths()["stdlib"]
    text = ""
    for module in ("difflib.py", "textwrap.py", "argparse.py", "inspect.py", "pathlib.py", "typing.py"):
        path = os.path.join(folder, module)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                text += f.read()
    return text[:limit]


class SDPAttention(nn.Module):
    def __init__(self, n_embd, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, attention):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, n_embd, num_heads, block, layers, make_attention):
        super().__init__()
        self.tokens = nn.Embedding(vocab, n_embd)
        self.positions = nn.Embedding(block, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, make_attention()) for _ in range(layers)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab)

    def forward(self, idx):
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def run_gpt(variants, steps, n_embd=64, num_heads=4, block=64, layers=2, batch=32, lr=3e-3, seed=0):
    text = stdlib_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    g = torch.Generator().manual_seed(1234)
    val_starts = torch.randint(0, len(val) - block - 1, (8, batch), generator=g)

    def batch_of(source, starts):
        x = torch.stack([source[s : s + block] for s in starts])
        y = torch.stack([source[s + 1 : s + block + 1] for s in starts])
        return x, y

    # Every variant takes its step in turn (round robin), so that a machine
    # whose load changes during the run slows them all alike.
    runs = {}
    for label, make_attention in variants.items():
        torch.manual_seed(seed)
        model = GPT(len(chars), n_embd, num_heads, block, layers, make_attention)
        runs[label] = dict(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
                           generator=torch.Generator().manual_seed(seed), times=[], worst=[0, 0], nonfinite=0,
                           warned=0)
    for _ in range(steps):
        for run in runs.values():
            model = run["model"]
            x, y = batch_of(train, torch.randint(0, len(train) - block - 1, (batch,), generator=run["generator"]))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", idl.ImplicitFunctionWarning)
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
                run["optimizer"].zero_grad()
                loss.backward()
                run["optimizer"].step()
                run["times"].append(time.perf_counter() - start)
            run["warned"] += sum(issubclass(w.category, idl.ImplicitFunctionWarning) for w in caught)
            run["nonfinite"] += not math.isfinite(loss.item())
            for blk in model.blocks:
                stats = getattr(blk.attention, "last_stats", None)
                if stats is not None and stats.backward is not None:
                    run["worst"] = [max(run["worst"][0], stats.forward["iterations"]),
                                    max(run["worst"][1], stats.backward["iterations"])]
    rows = {}
    for label, run in runs.items():
        model = run["model"]
        last = [getattr(blk.attention, "last_stats", None) for blk in model.blocks]
        iters = ""
        if last[0] is not None:
            iters = ("last " + ",".join(f"{s.forward['iterations']}/{s.backward['iterations']}" for s in last)
                     + f"; max {run['worst'][0]}/{run['worst'][1]}")
        with torch.no_grad():
            val_loss = sum(
                nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                for x, y in (batch_of(val, s) for s in val_starts)
            ) / len(val_starts)
        rows[label] = dict(val=val_loss, ms=1e3 * sorted(run["times"])[len(run["times"]) // 2], params=count(model),
                           iters=iters, nonfinite=run["nonfinite"], warned=run["warned"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one seed (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="series steps (default 400)")
    parser.add_argument("--gpt-steps", type=int, default=None, help="GPT steps (default 500)")
    parser.add_argument("--seeds", type=int, default=None, help="series seeds (default 9: one seed's test MSE varies by ±15%)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("series", "gpt"), default=None)
    parser.add_argument("--gpt-variants", default="sdpa,values,full",
                        help="comma list of sdpa, values, full, values-anderson")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 400)
    gpt_steps = args.gpt_steps or (20 if args.quick else 500)
    seeds = args.seeds or (1 if args.quick else 9)

    if args.only in (None, "series"):
        print(f"| series | model | params | test MSE, mean of {seeds} seeds (range) | ms/step | solver iters fwd/bwd |")
        print("|---|---|---|---|---|---|")
        for name in ("sunspots", "elnino"):
            for label, row in run_series(name, steps, seeds, 10, 10).items():
                mse = sum(row["mse"]) / len(row["mse"])
                ms = sum(row["ms"]) / len(row["ms"])
                spread = f"{min(row['mse']):.3f}–{max(row['mse']):.3f}"
                print(f"| {name} | {label} | {row['params']} | {mse:.4f} ({spread}) | {ms:.2f} | {row['iters']} |",
                      flush=True)

    if args.only in (None, "gpt"):
        n_embd, heads, block = 64, 4, 64
        makers = {
            "sdpa": ("causal SDPA", lambda: SDPAttention(n_embd, heads)),
            "values": ("implicit values", lambda: idl.ImplicitMultiHeadAttention(n_embd, heads, block)),
            "full": ("implicit full", lambda: idl.ImplicitMultiHeadAttention(n_embd, heads, block, feedback="full")),
            "values-anderson": ("implicit values anderson",
                                lambda: idl.ImplicitMultiHeadAttention(n_embd, heads, block, solver="anderson")),
        }
        variants = dict(makers[v] for v in args.gpt_variants.split(","))
        print(f"\n| char-GPT ({gpt_steps} steps) | params | val loss | ms/step | non-finite losses | "
              "solver warnings | solver iters fwd/bwd (last step, per block; max over training) |")
        print("|---|---|---|---|---|---|---|")
        for label, row in run_gpt(variants, gpt_steps).items():
            print(f"| {label} | {row['params']} | {row['val']:.3f} | {row['ms']:.1f} | {row['nonfinite']} | "
                  f"{row['warned']} | {row['iters']} |", flush=True)


if __name__ == "__main__":
    main()
