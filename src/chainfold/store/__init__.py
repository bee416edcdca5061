"""Where snapshots go: snapshot files (:mod:`.snapshots`) and crash-safe writes (:mod:`.atomic`)."""
