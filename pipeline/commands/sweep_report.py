"""The multi-seed report of one or more sweeps, from MLflow alone.

    python -m pipeline.commands.sweep_report sweep=<id> [confidence=0.95]
    python -m pipeline.commands.sweep_report 'sweep=[<id>,<id>]'    several sweeps together

writes reports/sweeps/<id>/ (several: reports/sweeps/<id>+<id>/) and logs it to the sweep's
parent run (pipeline.sweeps.report).
"""

from pipeline.guard.entrypoint import stage
from pipeline.sweeps.report import sweep_report_task

main = stage("sweep_report")(sweep_report_task)

if __name__ == "__main__":
    main()
