"""Training of the multi-label classifier and the segmenter."""
