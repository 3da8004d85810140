"""Inference: the `Predictor` (segmenter proposals + CLIP on masked crops, ensembled as reference
1.7), masked crops, SAM's automatic mask generation (`amg`), loading a predictor from a checkpoint,
inputs, results and pictures."""
