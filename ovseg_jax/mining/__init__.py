"""Mining mask-category pairs from captions (reference 4.1): noun extraction and the miner."""
