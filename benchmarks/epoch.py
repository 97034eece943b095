"""Seconds per training epoch and peak memory of the numpy RNNs, on the real MNIST data,
under the pinned numerics and the CPU's own (birnn.numerics), side by side.

    python benchmarks/epoch.py                  # epoch times (median of --repeats) + memory
    python benchmarks/epoch.py --memory-epochs 100   # peak RSS of a full 100-epoch training

Prints one JSON object: "pinned" and "native", each the timings below from its own child
process (numpy's kernels are chosen when it loads), the children alternating --rounds times
so that a busy machine slows both alike (each timing is the fastest round's median);
"native_speedup" (pinned / native seconds, per timing), "peak_rss_mib" (pinned) and "machine".
Timings:
  uni_f64_s, bi_f64_s, uni_f32_s, bi_f32_s  one training epoch: 55,000 sequences, batch 128
                                            (gather and scale a batch of uint8 images, forward,
                                            backward, SGD update; no validation)
  validation_pass_s                         one pass over the 5,000 validation sequences (bi, float64)
  book_epoch_uni_f64_s, book_epoch_bi_f64_s  one epoch through birnn.train as the book's run does it,
                                            the two checkpoint validation passes included
  peak_rss_mib                              peak resident memory of a child process that loads the
                                            data (uint8, as the train stage passes it) and trains
                                            uni then bi, float64, with checkpoints
Targets (2-core machine, float64, pinned): uni <= 0.8 s, bi <= 1.0 s, peak memory of a full
run <= 300 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from birnn import BiRNN, TrainSettings, UniRNN, numerics, softmax_cross_entropy, train  # first: the pin
from birnn.data import load_mnist, shuffle_split
from birnn.training import model_inputs

import numpy as np  # noqa: E402  (after birnn: see birnn.numerics)
from threadpoolctl import threadpool_limits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "data" / "raw" / "mnist"


def load():
    """The book's training and validation split, uint8 pixels (N, 28, 28)."""
    images, labels = load_mnist(MNIST, "train")
    return shuffle_split(images, labels, val_fraction=1 / 12, seed=0)


CLOCKS = {"wall": time.perf_counter,
          # this process's CPU seconds: on a busy machine, less disturbed by the other load
          # (BLAS runs on one thread, so it is the work done)
          "cpu": time.process_time}


def epoch_seconds(model, x, y, batch_size=128, seed=0, clock=time.perf_counter) -> float:
    """One epoch of the training loop's work (shuffle, gather, scale, forward, backward, update)."""
    order = np.random.default_rng(seed).permutation(len(x))
    params = model.params
    start = clock()
    for first in range(0, len(x), batch_size):
        batch = order[first:first + batch_size]
        logits, cache = model.forward(model_inputs(x[batch], model.dtype))
        _, dlogits = softmax_cross_entropy(logits, y[batch])
        for name, grad in model.backward(cache, dlogits).items():
            grad *= 0.005
            params[name] -= grad
    return clock() - start


def timings(repeats: int, clock=time.perf_counter) -> dict:
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        x, y, val_x, val_y = load()
        for dtype, tag in (("float64", "f64"), ("float32", "f32")):
            for kind, make in (("uni", UniRNN), ("bi", BiRNN)):
                model = make(seed=0, dtype=dtype)
                epoch_seconds(model, x[:5000], y[:5000])                   # warm-up
                out[f"{kind}_{tag}_s"] = statistics.median(epoch_seconds(model, x, y, clock=clock)
                                                             for _ in range(repeats))
            if dtype == "float64":
                model = BiRNN(seed=0)
                val_features = model_inputs(val_x, model.dtype)   # as train() does, once
                runs = []
                for _ in range(repeats):
                    start = clock()
                    model.predict_logits(val_features)
                    runs.append(clock() - start)
                out["validation_pass_s"] = statistics.median(runs)
                for kind, model, lr in (("uni", UniRNN(seed=0), 0.005), ("bi", BiRNN(seed=0), 0.01)):
                    start = clock()
                    train(model, x, y, val_x, val_y, TrainSettings(epochs=1, lr=lr), log=None)
                    out[f"book_epoch_{kind}_f64_s"] = clock() - start
    return {k: round(v, 3) for k, v in out.items()}


def memory_child(epochs: int) -> None:
    """Run in a subprocess: load data, train uni then bi as the book, print peak RSS."""
    x, y, val_x, val_y = load()
    for model, lr in ((UniRNN(seed=0), 0.005), (BiRNN(seed=0), 0.01)):
        train(model, x, y, val_x, val_y, TrainSettings(epochs=epochs, lr=lr), log=None)
    print(own_peak_rss_kib() / 1024)


def own_peak_rss_kib() -> float:
    """This process's peak resident memory. On Linux, VmHWM: ru_maxrss would start at the RSS
    of the parent that forked it (the benchmark's, with its own data loaded)."""
    try:
        with open("/proc/self/status") as status:
            return next(float(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)


def timings_child(mode: str, repeats: int, clock: str) -> dict:
    """The timings, measured in a child process that runs ``mode`` numerics."""
    done = subprocess.run([sys.executable, __file__, "--timings-child", mode, "--repeats", str(repeats),
                           "--clock", clock],
                          env=numerics.environment(mode), check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(repeats: int, rounds: int, clock: str) -> dict:
    """Pinned and native timings, alternating child processes; per timing the fastest round."""
    best: dict[str, dict] = {"pinned": {}, "native": {}}
    for _ in range(rounds):
        for mode in best:
            measured = timings_child(mode, repeats, clock)
            best[mode]["numerics"] = measured.pop("numerics")
            for key, seconds in measured.items():
                best[mode][key] = min(seconds, best[mode].get(key, seconds))
    speedup = {key: round(best["pinned"][key] / best["native"][key], 2)
               for key in best["pinned"] if key.endswith("_s")}
    return {**best, "native_speedup": speedup}


def peak_rss_mib(epochs: int) -> float:
    done = subprocess.run([sys.executable, __file__, "--memory-child", str(epochs)],
                          check=True, capture_output=True, text=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per configuration (median)")
    parser.add_argument("--memory-epochs", type=int, default=2,
                        help="epochs of the memory run (memory is flat after the first; 100 = full book run)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="pinned and native child processes, alternating, per mode")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall seconds, or this process's CPU seconds (on a busy machine)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timings-child", choices=numerics.MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    if args.timings_child is not None:
        state = numerics.require(args.timings_child)
        print(json.dumps({**timings(args.repeats, CLOCKS[args.clock]), "numerics": state.tags()}))
        return
    report = side_by_side(args.repeats, args.rounds, args.clock)
    report["clock"] = args.clock
    report["peak_rss_mib"] = peak_rss_mib(args.memory_epochs)
    report["memory_epochs"] = args.memory_epochs
    report["machine"] = {"python": platform.python_version(), "numpy": np.__version__,
                         "cpu": numerics.cpu_model(), "cpus": os.cpu_count()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
