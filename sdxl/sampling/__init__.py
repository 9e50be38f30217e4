"""Sampling in the style of k-diffusion: schedules (schedules.py), samplers over a denoiser
(samplers.py), and the step loop, eager or replayed as a CUDA graph (loop.py)."""
