"""Evaluation: confusion-matrix metrics, the dataset-wide evaluator (sweeps, TTA, devices,
processes), the paper's protocol per benchmark, seen/unseen classes, reports and zero-shot crop
accuracy."""
