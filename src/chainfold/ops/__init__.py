"""The library's commands, one call each for the CLI: :mod:`.verify`, :mod:`.rebuild`, :mod:`.reconcile`
(with :mod:`.corrections`, :mod:`.evidence`, :mod:`.positions`), :mod:`.rewind`, :mod:`.proofs`."""
