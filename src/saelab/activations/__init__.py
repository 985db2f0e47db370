"""Activations of the base model (`extract_mlp8`): hook points, the extractor and the
sharded store every later stage reads."""
