"""Hashes over the log: chained RFC 9162 segment trees (:mod:`.chain`), the files that record them
(:mod:`.checkpoints`), and the pass that computes and checks them (:mod:`.scan`). The RFC 9162
primitives themselves are the public :mod:`chainfold.merkle`."""
