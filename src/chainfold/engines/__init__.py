"""Engines that run a replay beyond one process: several processes on one machine (:mod:`.parallel`)."""
