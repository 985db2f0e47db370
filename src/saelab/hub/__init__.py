"""Sharing results on the Hugging Face Hub (the activation store as a dataset)."""
