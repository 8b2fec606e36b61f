"""Measuring a fine-tune: generation on fixed prompts and seeds, image features, FID / KID, reports."""
