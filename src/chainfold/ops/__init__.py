"""The library's commands, one call each for the CLI: :mod:`.verify`, :mod:`.rebuild`, :mod:`.reconcile`,
:mod:`.proofs`."""
