"""Issue 5's reference training configuration in PyTorch, as a PyTorch user writes it.

The baseline `scripts/bench-vs-pytorch.sh` measures in the same run as MAD's own
`cargo bench --bench training -- sliding`: a 20,160-point series (14 days at 1 minute), every
window of 64 points one sample starting from a zero state and forecasting the point after it,
one LSTM layer of hidden size 32 and a linear head, batch 64, shuffled, Adam at 1e-3, 5 epochs,
one thread. The inputs have MAD's default width (value plus day and week sine/cosine); their
content does not change the work, but a daily rhythm with noise keeps the loss honest.

Two loops, both timed in thread CPU seconds per epoch: the usual `DataLoader` over a
`TensorDataset`, and batches indexed straight out of one tensor (what a careful user writes;
the faster of the two is the fair baseline). Prints one line per loop, the last word the median.
"""

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STEP_SECS = 60
DAY = 86_400
WEEK = 7 * DAY


def series(points: int, seed: int) -> torch.Tensor:
    """Input rows [points, 5]: a standardised value with a daily rhythm, then the clock features."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(points, dtype=torch.float64) * STEP_SECS
    day = 2 * math.pi * t / DAY
    week = 2 * math.pi * t / WEEK
    noise = torch.randn(points, generator=generator, dtype=torch.float64)
    value = 1 + 0.45 * torch.sin(day) + 0.05 * noise
    value = (value - value.mean()) / value.std()
    return torch.stack(
        [value, torch.sin(day), torch.cos(day), torch.sin(week), torch.cos(week)], dim=1
    ).float()


class Forecaster(nn.Module):
    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(windows)
        return self.head(out[:, -1]).squeeze(-1)


def train(windows, targets, args, use_loader: bool) -> list:
    torch.manual_seed(args.seed)
    model = Forecaster(windows.shape[2], args.hidden)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    loader = DataLoader(TensorDataset(windows, targets), batch_size=args.batch, shuffle=True)
    epochs = []
    for _ in range(args.epochs):
        start = time.thread_time()
        if use_loader:
            batches = iter(loader)
        else:
            order = torch.randperm(len(windows))
            batches = (
                (windows[index], targets[index])
                for index in order.split(args.batch)
            )
        for x, y in batches:
            optimiser.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimiser.step()
        epochs.append(time.thread_time() - start)
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=14 * 24 * 60)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    rows = series(args.points, args.seed)
    count = args.points - args.window
    windows = rows.unfold(0, args.window, 1)[:count].transpose(1, 2).contiguous()
    targets = rows[args.window :, 0].clone()
    assert windows.shape == (count, args.window, rows.shape[1])
    print(
        f"PyTorch {torch.__version__}, {torch.get_num_threads()} thread, {count} windows "
        f"of {args.window}, hidden {args.hidden}, batch {args.batch}, {args.epochs} epochs"
    )
    for name, use_loader in (("DataLoader", True), ("indexed batches", False)):
        epochs = train(windows, targets, args, use_loader)
        shown = ", ".join(f"{secs:.3f}" for secs in epochs)
        print(
            f"pytorch {name}: epochs {shown} s CPU each; median "
            f"{statistics.median(epochs):.3f}"
        )


if __name__ == "__main__":
    main()
