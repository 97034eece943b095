"""The reports: table 19-12 and the figures."""
