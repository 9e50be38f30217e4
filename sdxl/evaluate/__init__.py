"""Evaluation of generated datasets: FID, KID (Inception features) and CLIP score."""
