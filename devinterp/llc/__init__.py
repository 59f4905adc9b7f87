"""The local learning coefficient: the SGLD estimator (sampler.py) and its use on a run's weight
snapshots (snapshots.py)."""
