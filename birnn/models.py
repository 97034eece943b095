"""The book's unidirectional and bidirectional vanilla RNN classifiers.

Both read a sequence X: (N, T, D), run tanh chains over it and classify from the
chains' FINAL states only (output at the last step, as in chapter 19.7):

    uni:  s_t  = tanh(x_t U + s_{t-1} W + bU),           z = s_{T-1} V + bV
    bi:   s1_t = tanh(x_t U1 + s1_{t-1} W1 + bU1)          (reads x_0 .. x_{T-1})
          s2_i = tanh(x_{T-1-i} U2 + s2_{i-1} W2 + bU2)    (reads the sequence reversed)
          z    = merge(s1_{T-1}, s2_{T-1}) V + bV           merge: sum (book), concat, mean, mul

One hidden bias per chain (the book's code; PyTorch would have two).

Speed: the chains of a model run as ONE recurrence over their stacked states, with a
block-diagonal recurrent matrix. Off-diagonal blocks are exact zeros, so the maths is
unchanged, while the bidirectional net pays the Python loop over 28 steps once
instead of twice.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birnn.layers import rnn_backward, rnn_forward

MERGES = ("sum", "concat", "mean", "mul")
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class _Chain:
    """Names of one chain's tensors, its slice of the stacked state, and its direction."""

    U: str
    W: str
    b: str
    states: slice
    reverse: bool


class RNNClassifier:
    """Shared machinery of UniRNN and BiRNN: parameters, forward/backward, counting, I/O.

    Subclasses define ``chains`` (one or two), the merge of the final states and
    ``config`` (the constructor arguments, enough to rebuild the model).
    """

    chains: tuple[_Chain, ...]
    merge: str
    config: dict

    def __init__(self, dtype: str | np.dtype, seed: int | np.random.Generator):
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype.name!r}")
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.params: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- init
    def _init_weight(self, name: str, fan_in: int, fan_out: int) -> None:
        """Normal with std 1/sqrt(fan_in), drawn in float64 so float32 is a rounding of it."""
        w = self.rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        self.params[name] = w.astype(self.dtype)

    def _init_bias(self, name: str, size: int) -> None:
        self.params[name] = np.zeros(size, dtype=self.dtype)

    # ------------------------------------------------------------ forward
    def _stacked_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Ub: (D + 1, H_total), the chains' U side by side with their biases as the last row;
        W: (H_total, H_total), the chains' W on the diagonal."""
        p = self.params
        Ub = np.concatenate([np.vstack([p[c.U], p[c.b]]) for c in self.chains], axis=1)
        if len(self.chains) == 1:
            return Ub, p[self.chains[0].W]
        W = np.zeros((Ub.shape[1], Ub.shape[1]), dtype=self.dtype)
        for c in self.chains:
            W[c.states, c.states] = p[c.W]
        return Ub, W

    def forward(self, X: np.ndarray) -> tuple[np.ndarray, tuple]:
        """X: (N, T, D) -> (logits (N, C), cache for ``backward``)."""
        X = np.asarray(X, dtype=self.dtype)
        D = self.config["input_size"]
        if X.ndim != 3 or X.shape[2] != D:
            raise ValueError(f"expected input of shape (N, T, {D}), got {X.shape}")
        N, T, _ = X.shape
        Ub, W = self._stacked_weights()
        # Time-major input with a column of ones: the bias rides along in the
        # projection matmul here and its gradient in the dU matmul of backward.
        X1 = np.empty((T, N, D + 1), dtype=self.dtype)
        X1[:, :, :D] = X.transpose(1, 0, 2)
        X1[:, :, D] = 1.0
        P = X1 @ Ub                                    # (T, N, H_total): all steps, all chains
        for c in self.chains:
            if c.reverse:                                            # chain step i reads x_{T-1-i}
                P[:, :, c.states] = P[::-1, :, c.states]
        S = rnn_forward(P, W)
        merged = self._merge(S[-1])
        logits = merged @ self.params["V"] + self.params["bV"]
        return logits, (X1, S, W, merged)

    def backward(self, cache: tuple, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """dlogits: (N, C) -> gradients, a dict with the same keys and shapes as ``params``."""
        X1, S, W, merged = cache
        grads = {"V": merged.T @ dlogits, "bV": dlogits.sum(axis=0)}
        d_merged = dlogits @ self.params["V"].T
        blocks = tuple(c.states for c in self.chains)
        dP, dWs = rnn_backward(self._merge_backward(d_merged, S[-1]), S, W, blocks)
        for c in self.chains:
            if c.reverse:                                            # back to natural time order
                dP[:, :, c.states] = dP[::-1, :, c.states]
        # Batched over steps then summed: faster than one (D+1, T*N) @ (T*N, H) product.
        dUb = np.matmul(X1.transpose(0, 2, 1), dP).sum(axis=0)     # (D + 1, H_total)
        for c, dW in zip(self.chains, dWs):
            grads[c.U] = dUb[:-1, c.states]
            grads[c.b] = dUb[-1, c.states]
            grads[c.W] = dW
        return grads

    def predict_logits(self, X: np.ndarray, batch_size: int = 5000) -> np.ndarray:
        """Logits (N, C) for X: (N, T, D), in chunks so memory stays bounded."""
        chunks = [self.forward(X[i:i + batch_size])[0] for i in range(0, len(X), batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0, self.config["num_classes"]), self.dtype)

    # -------------------------------------------------------------- merge
    def _merge(self, final: np.ndarray) -> np.ndarray:
        """final: (N, H_total) stacked final states -> (N, V's fan-in)."""
        return final

    def _merge_backward(self, d_merged: np.ndarray, final: np.ndarray) -> np.ndarray:
        return d_merged

    # ---------------------------------------------------------- counting
    def param_count(self) -> dict[str, int]:
        """Number of scalars per tensor, in the book's order, plus ``total``."""
        counts = {name: int(value.size) for name, value in self.params.items()}
        counts["total"] = sum(counts.values())
        return counts

    # ---------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> None:
        """Write params and config to ``path`` (.npz), atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, __config__=np.array(json.dumps(self.config)), **self.params)
        tmp.replace(path)

    def load_params(self, path: str | Path) -> None:
        """Load parameters saved by ``save`` into this model; other shapes are an error."""
        _, params = _read_npz(path)
        self.set_params(params, source=str(path))

    def set_params(self, params: dict[str, np.ndarray], source: str = "params") -> None:
        """Replace all parameters (copied, cast to the model's dtype) after checking names and shapes."""
        if set(params) != set(self.params):
            raise ValueError(f"{source}: tensors {sorted(params)} do not match the model's {sorted(self.params)}")
        for name, value in params.items():
            if value.shape != self.params[name].shape:
                raise ValueError(f"{source}: tensor {name} has shape {value.shape}, "
                                 f"the model expects {self.params[name].shape}")
        self.params = {name: np.array(params[name], dtype=self.dtype) for name in self.params}


class UniRNN(RNNClassifier):
    """Unidirectional tanh RNN, output at the last step. Params U (D,H), W (H,H), bU (H,), V (H,C), bV (C,)."""

    chains = (_Chain("U", "W", "bU", slice(None), reverse=False),)

    def __init__(self, input_size: int = 28, hidden_size: int = 32, num_classes: int = 10, *,
                 seed: int | np.random.Generator = 0, dtype: str = "float64"):
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_classes=num_classes)
        super().__init__(dtype, seed)
        self.config = {"kind": "uni", "input_size": input_size, "hidden_size": hidden_size,
                       "num_classes": num_classes, "dtype": self.dtype.name}
        self._init_weight("U", input_size, hidden_size)
        self._init_weight("W", hidden_size, hidden_size)
        self._init_bias("bU", hidden_size)
        self._init_weight("V", hidden_size, num_classes)
        self._init_bias("bV", num_classes)


class BiRNN(RNNClassifier):
    """Bidirectional tanh RNN: a forward chain (U1, W1, bU1) and a reverse chain (U2, W2, bU2)
    whose final states are merged and fed to V (H_merged, C), bV (C,)."""

    def __init__(self, input_size: int = 28, hidden_fwd: int = 20, hidden_bwd: int = 20,
                 num_classes: int = 10, merge: str = "sum", *,
                 seed: int | np.random.Generator = 0, dtype: str = "float64"):
        _check_sizes(input_size=input_size, hidden_fwd=hidden_fwd, hidden_bwd=hidden_bwd,
                     num_classes=num_classes)
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if merge != "concat" and hidden_fwd != hidden_bwd:
            raise ValueError(f"merge {merge!r} needs equal hidden sizes, got hidden_fwd={hidden_fwd} "
                             f"and hidden_bwd={hidden_bwd} (use merge='concat')")
        super().__init__(dtype, seed)
        self.merge = merge
        self.config = {"kind": "bi", "input_size": input_size, "hidden_fwd": hidden_fwd,
                       "hidden_bwd": hidden_bwd, "num_classes": num_classes, "merge": merge,
                       "dtype": self.dtype.name}
        total = hidden_fwd + hidden_bwd
        self.chains = (_Chain("U1", "W1", "bU1", slice(0, hidden_fwd), reverse=False),
                       _Chain("U2", "W2", "bU2", slice(hidden_fwd, total), reverse=True))
        self._init_weight("U1", input_size, hidden_fwd)
        self._init_weight("W1", hidden_fwd, hidden_fwd)
        self._init_bias("bU1", hidden_fwd)
        self._init_weight("U2", input_size, hidden_bwd)
        self._init_weight("W2", hidden_bwd, hidden_bwd)
        self._init_bias("bU2", hidden_bwd)
        self._init_weight("V", total if merge == "concat" else hidden_fwd, num_classes)
        self._init_bias("bV", num_classes)

    def _merge(self, final: np.ndarray) -> np.ndarray:
        s1, s2 = final[:, self.chains[0].states], final[:, self.chains[1].states]
        if self.merge == "sum":
            return s1 + s2
        if self.merge == "mean":
            return 0.5 * (s1 + s2)
        if self.merge == "mul":
            return s1 * s2
        return final                                                 # concat: already side by side

    def _merge_backward(self, d_merged: np.ndarray, final: np.ndarray) -> np.ndarray:
        s1, s2 = final[:, self.chains[0].states], final[:, self.chains[1].states]
        if self.merge == "sum":
            return np.concatenate([d_merged, d_merged], axis=1)
        if self.merge == "mean":
            half = 0.5 * d_merged
            return np.concatenate([half, half], axis=1)
        if self.merge == "mul":
            return np.concatenate([d_merged * s2, d_merged * s1], axis=1)
        return d_merged


MODEL_KINDS = {"uni": UniRNN, "bi": BiRNN}


def build_model(kind: str, **kwargs) -> RNNClassifier:
    """``build_model("uni", hidden_size=32)`` or ``build_model("bi", hidden_fwd=20, ...)``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    return MODEL_KINDS[kind](**kwargs)


def load_model(path: str | Path) -> RNNClassifier:
    """Rebuild the model saved at ``path`` (by ``RNNClassifier.save``) with its parameters."""
    config, params = _read_npz(path)
    model = build_model(**config)
    model.set_params(params, source=str(path))
    return model


def _read_npz(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # missing, corrupt, truncated
        raise ValueError(f"{path}: cannot read saved parameters: {exc}") from None
    if "__config__" not in arrays:
        raise ValueError(f"{path}: not a birnn parameter file (no __config__ entry)")
    return json.loads(str(arrays.pop("__config__"))), arrays


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
