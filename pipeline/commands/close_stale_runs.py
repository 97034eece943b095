"""End KILLED the runs that processes of this host left RUNNING when they died (``kill -9``, the
out-of-memory killer); runs of live processes and of other hosts are not touched
(pipeline.tracking.stale_runs says how a dead owner is recognised).

    python -m pipeline.commands.close_stale_runs [--tracking-uri URI] [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from omegaconf import OmegaConf

from pipeline.guard import credentials
from pipeline.guard.errors import expected_errors, one_line
from pipeline.tracking import stale_runs, store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.commands.close_stale_runs",
        description="End KILLED the runs that processes of this host left RUNNING when they "
                    "died (kill -9, out of memory). Runs of live processes and of other hosts "
                    "are not touched.")
    parser.add_argument("--tracking-uri", default=None,
                        help="the store (default: $MLFLOW_TRACKING_URI, else the project's "
                             "mlflow.db); credentials go in MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, not in the URI")
    parser.add_argument("--dry-run", action="store_true", help="list them, change nothing")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    tracking = OmegaConf.create({"uri": args.tracking_uri, "probe_timeout_seconds": 10})
    try:
        credentials.check_environment(os.environ)
        what = credentials.found_in(args.tracking_uri or "")
        if what is not None:
            raise credentials.refusal("--tracking-uri", what)
        client = store.connect(tracking, close_stale=False)
        stale = stale_runs.find_stale_runs(client)
        for run in stale:
            if not args.dry_run:
                stale_runs.close(client, run)
            print(f"{run.info.run_id} {run.info.run_name!r} "
                  f"(pid {run.data.tags.get(stale_runs.PID_TAG)})"
                  f"{'' if args.dry_run else ': ended KILLED'}")
    except expected_errors() as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    verb = "would end" if args.dry_run else "ended"
    print(f"{len(stale)} stale run(s) of host {socket.gethostname()} {verb} in "
          f"{client.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
