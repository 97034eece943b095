"""The benchmark's training epoch in PyTorch on the CPU, for comparison with birnn's
(benchmarks/epoch.py): the same 55,000 MNIST sequences, batch 128, float64, forward, loss,
backward and an SGD update, torch.nn.RNN (tanh) with the output at the last step; uni 32
units, bi 20 + 20 with the final states summed.

PyTorch is not a dependency of the project: run this in a virtualenv that has it, from the
project root (it reads the data with birnn.data, numpy and threadpoolctl):

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy threadpoolctl
    PYTHONPATH=. /tmp/torch/bin/python benchmarks/torch_epoch.py

(pyproject.toml's `torch` extra names it.)

Prints one JSON object: uni_f64_s and bi_f64_s (the fastest of --repeats epochs) with
PyTorch on one thread (as birnn's BLAS runs) and on all cores, and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from birnn.data import load_mnist, shuffle_split  # first: birnn pins numpy's kernels

import torch  # noqa: E402

MNIST = Path(__file__).resolve().parent.parent / "data" / "raw" / "mnist"


class Net(torch.nn.Module):
    """An RNN over the 28 rows, classified from its final state (summed over directions)."""

    def __init__(self, hidden: int, bidirectional: bool):
        super().__init__()
        self.rnn = torch.nn.RNN(28, hidden, nonlinearity="tanh", batch_first=True,
                                bidirectional=bidirectional)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, final = self.rnn(x)          # final: (directions, N, hidden)
        return self.out(final.sum(dim=0))


def epoch_seconds(net: Net, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128,
                  clock=time.perf_counter) -> float:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.005)
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    start = clock()
    for first in range(0, len(x), batch_size):
        batch = order[first:first + batch_size]
        optimizer.zero_grad()
        loss = loss_fn(net(x[batch].to(torch.float64) / 255.0), y[batch])
        loss.backward()
        optimizer.step()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed (fastest)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="PyTorch's thread counts to time (default: 1 and all cores)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall seconds, or this process's CPU seconds (one thread only)")
    args = parser.parse_args()
    images, labels = load_mnist(MNIST, "train")
    x_np, y_np, _, _ = shuffle_split(images, labels, val_fraction=1 / 12, seed=0)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np.astype("int64"))
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    report = {"clock": args.clock}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for kind, net in (("uni", Net(32, False)), ("bi", Net(20, True))):
            epoch_seconds(net, x[:5000], y[:5000])  # warm-up
            report[f"{kind}_f64_s_{threads}_threads"] = round(
                min(epoch_seconds(net, x, y, clock=clock) for _ in range(args.repeats)), 3)
    report["machine"] = {"torch": torch.__version__, "cpus": os.cpu_count()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
