"""The replay stages after the source and the hash: :mod:`.decode` (bytes become events; malformed
entries, duplicates, with :mod:`.seen`, the index of folded ids), :mod:`.fold` (the model over
events, per stream; models in :mod:`.model`), and :mod:`.pipeline`, which wires the stages into one
pass over a partition."""
