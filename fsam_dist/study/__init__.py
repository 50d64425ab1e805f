"""The seeded generalisation study (AdamW vs SAM vs FSAM from one pretrained start): ``python -m fsam_dist.study``."""
