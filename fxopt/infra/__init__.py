"""The pass infrastructure: registry, pass manager, rewrite engine, report, progress bars."""
