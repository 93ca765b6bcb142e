"""Tensor mathematics of swsc_hf, independent of transformers."""
