"""Building blocks the methods share, by kind: network modules (``nn``), losses, masking, physical
neighbourhoods and spatial context, feature scaling, the retrieval bank and cell-type deconvolution."""
