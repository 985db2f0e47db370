"""What every stage shares: typed params (config), the file contract (paths), errors,
atomic writes, runtime set-up, MLflow tracking, the stage wrapper, plots, Hub access.

Imports nothing from the other subpackages: everything else builds on this.
"""
