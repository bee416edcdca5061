"""The replay: the fold of events into one state per stream (:mod:`.fold`: models, the folder)."""
