"""Engines that run the replay stages beyond one process: worker processes on one machine
(:mod:`.pool`, :mod:`.parallel`)."""
