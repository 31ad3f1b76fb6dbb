"""ViT backbone, DINO/iBOT heads and weight conversion."""
