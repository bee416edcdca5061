"""Where snapshots go: the topic's snapshots (:mod:`.snapshots`), the storage that holds their files
(:mod:`.storage`: interface and local folder), their bytes (:mod:`.codec`), the snapshot sink of a
replay (:mod:`.sink`) and crash-safe writes (:mod:`.atomic`)."""
