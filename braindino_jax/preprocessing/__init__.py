"""Volume → axial slices: orientation, resampling, masks, intensity, slice selection (pure numpy)."""
