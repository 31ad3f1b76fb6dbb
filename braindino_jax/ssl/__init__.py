"""Self-supervised objectives: DINO, iBOT, KoLeo, Gram anchoring, collapse diagnostics."""
