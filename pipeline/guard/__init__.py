"""What guards a command and cannot change an output: the entry point's one-line errors,
signals, credentials, where a stage may write, writers' locks. The DVC stages do not depend
on this package (tests/test_dvc_deps.py), so rewording a message retrains nothing."""
