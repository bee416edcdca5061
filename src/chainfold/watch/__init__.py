"""``chainfold watch``: live divergence detection (the parts that do not depend on the replay stages).

follow.py   EvidenceFollower: a worker's Tracker directory, read as it grows
compare.py  HandlingComparator: the worker's handling against the reference, incrementally
metrics.py  WatchMetrics: Prometheus metrics at /metrics (extra ``chainfold[watch]``)
output.py   WatchLines (JSON lines on stdout), StderrStatus, StopOnSignals
"""
