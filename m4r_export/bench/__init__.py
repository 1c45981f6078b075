"""Benchmarks beyond ``m4r bench``'s artifact-vs-PyTorch grid (the peer model comparison)."""
