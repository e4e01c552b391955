"""The implicit attention head against an explicit softmax head in a small
sequence model, on generated in-context lookup data.

Every sequence draws its own dictionary key -> value (8 keys, 8 values). Each
token shows a key and either its value or "?"; at a "?" token whose key was
shown earlier with its value, the model must name that value. One causal
attention head can do it (attend to earlier tokens with the same key, read
their value), so the models differ only in the head:

    embedding(key) + embedding(value or ?) -> x
    x + proj(head(x)) -> LayerNorm -> Linear -> logits over the 8 values

The explicit heads get a larger head_size so the parameter counts match. The
implicit heads use the default feedback="values" (always converges).
Prints test accuracy and cross-entropy on the "?" tokens, parameter counts and
training time. CPU, about a minute. Run: python examples/attention_vs_softmax.py
"""
import time

import torch
from torch import nn

import idl
from idl.attention import lipschitz_attention, softmax_attention

KEYS, VALUES, T, N_EMBD = 8, 8, 16, 32
HIDDEN_VALUE = VALUES  # the "?" symbol


class ExplicitHead(nn.Module):
    """The usual causal self-attention head (as in nanoGPT, without dropout):
    k, q, v are linear maps of the input, then ``attention`` (idl's softmax or
    Lipschitz attention function) mixes them."""

    def __init__(self, n_embd, head_size, block_size, attention):
        super().__init__()
        self.attention = attention
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size, dtype=torch.bool)))

    def forward(self, x):
        mask = self.mask[: x.shape[1], : x.shape[1]]
        return self.attention(self.query(x), self.key(x), self.value(x), mask)


class LookupModel(nn.Module):
    def __init__(self, head, head_size):
        super().__init__()
        self.key_embedding = nn.Embedding(KEYS, N_EMBD)
        self.value_embedding = nn.Embedding(VALUES + 1, N_EMBD)
        self.head = head
        self.proj = nn.Linear(head_size, N_EMBD)
        self.norm = nn.LayerNorm(N_EMBD)
        self.readout = nn.Linear(N_EMBD, VALUES)

    def forward(self, keys, values):
        x = self.key_embedding(keys) + self.value_embedding(values)
        return self.readout(self.norm(x + self.proj(self.head(x))))


def lookup_data(count, generator):
    """keys, shown values (HIDDEN_VALUE where hidden), targets (-100 where
    there is nothing to predict: value shown, or key not shown before)."""
    dictionary = torch.stack([torch.randperm(VALUES, generator=generator) for _ in range(count)])
    keys = torch.randint(0, KEYS, (count, T), generator=generator)
    true_values = dictionary.gather(1, keys)
    hidden = torch.rand(count, T, generator=generator) < 0.5
    shown = torch.where(hidden, torch.full_like(keys, HIDDEN_VALUE), true_values)
    same_key = keys[:, :, None] == keys[:, None, :]  # [b, i, j]: key_i == key_j
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)
    answerable = (same_key & earlier & ~hidden[:, None, :]).any(dim=2) & hidden
    targets = torch.where(answerable, true_values, torch.full_like(keys, -100))
    return keys, shown, targets


def train(model, data, steps, lr=3e-3, batch=64, seed=0):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    keys, shown, targets = data
    for _ in range(steps):
        index = torch.randint(0, len(keys), (batch,), generator=generator)
        logits = model(keys[index], shown[index])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets[index].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


@torch.no_grad()
def evaluate(model, data):
    keys, shown, targets = data
    logits = model(keys, shown)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    scored = targets >= 0
    accuracy = (logits.argmax(-1)[scored] == targets[scored]).float().mean().item()
    return accuracy, loss


def models():
    def build(head, head_size):
        torch.manual_seed(0)
        return LookupModel(head(head_size), head_size)

    def implicit(attention):
        # float32 states reach about 10 here, so their round-off is ~1e-6:
        # ask for 1e-4 rather than the default 3e-6.
        return lambda hs: idl.ImplicitAttentionHead(N_EMBD, hs, T, attention, tol=1e-4, grad_tol=1e-4)

    return {
        "explicit softmax (hs 14)": build(lambda hs: ExplicitHead(N_EMBD, hs, T, softmax_attention), 14),
        "explicit lipschitz (hs 14)": build(lambda hs: ExplicitHead(N_EMBD, hs, T, lipschitz_attention), 14),
        "implicit softmax (hs 8)": build(implicit("softmax"), 8),
        "implicit lipschitz (hs 8)": build(implicit("lipschitz"), 8),
    }


def main(steps=600):
    torch.set_num_threads(1)  # small matrices: threads only add synchronisation
    generator = torch.Generator().manual_seed(0)
    train_data, test_data = lookup_data(8000, generator), lookup_data(2000, generator)
    print(f"{'model':<27}{'head params':>12}{'all params':>11}{'test acc':>10}{'test CE':>9}{'train s':>9}")
    for name, model in models().items():
        torch.manual_seed(1)
        start = time.perf_counter()
        train(model, train_data, steps)
        seconds = time.perf_counter() - start
        accuracy, loss = evaluate(model, test_data)
        head_params = sum(p.numel() for p in model.head.parameters()) + sum(p.numel() for p in model.proj.parameters())
        all_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<27}{head_params:>12}{all_params:>11}{accuracy:>10.3f}{loss:>9.3f}{seconds:>9.1f}")
        stats = getattr(model.head, "last_stats", None)
        if stats is not None:  # the test-set solve
            print(f"{'':<27}test solve: {stats.forward['iterations']} iterations, "
                  f"residual {stats.forward['residual']:.1e}, converged {stats.forward['converged']}")
    print("(head params include the projection back to n_embd; chance accuracy is 1/8)")


if __name__ == "__main__":
    main()
