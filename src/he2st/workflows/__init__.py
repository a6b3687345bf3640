"""The steps a user runs, each reading its run configuration: prepare, embed, train, benchmark
(with the per-fold protocol), evaluate a checkpoint, predict a slide."""
