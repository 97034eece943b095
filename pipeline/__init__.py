"""The Hydra/MLflow/DVC pipeline around birnn: stages, tracking, sweeps, reports."""

import birnn  # noqa: F401  first: it pins numpy's kernels before anything else loads numpy
