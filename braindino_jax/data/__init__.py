"""Record schema, Grain input pipeline, on-device augmentation and iBOT masking."""
