"""Choosing the SAE's size, learning rate and token budget (`fit_scaling_laws`): pilot
grids, power-law fits and the compute budget."""
