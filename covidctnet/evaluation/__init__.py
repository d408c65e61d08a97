"""Judging predictions: statistics (Wilson, DeLong, McNemar, kappa), metrics, evaluate, reader study, plots."""
