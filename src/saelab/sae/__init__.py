"""The SAE (`train_sae`): the autoencoder and its export, the trainer, its checkpoints and
schedules, and the evaluations it reports."""
