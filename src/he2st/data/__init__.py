"""Data as contracts: samples (AnnData + slide), readers, patches, gene panels, folds, embedding files
and the work-folder layout. Nothing here knows about encoders or methods."""
