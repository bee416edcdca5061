"""Hashes over the log: chained RFC 9162 segment trees (:mod:`.chain`), the files that record them
(:mod:`.checkpoints`, :mod:`.record`), and the hash stage that computes and checks them as a replay
reads the log (:mod:`.stage`). The RFC 9162 primitives themselves are the public
:mod:`chainfold.merkle`."""
