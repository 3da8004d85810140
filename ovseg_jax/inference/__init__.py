"""Inference: the `Predictor` (segmenter proposals + CLIP on masked crops, ensembled as reference
1.7), masked crops, loading a predictor from a checkpoint, inputs, results and pictures."""
