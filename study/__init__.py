"""This project's own study of uni vs bi (reports/findings.md), built on the pipeline's public
functions; not part of the installed package."""
