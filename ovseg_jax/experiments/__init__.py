"""Whole experiments on the synthetic world: the demo (every stage, the paper's tables) and the
appendix's CLIP adaptation ablations."""
