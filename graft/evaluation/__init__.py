"""Scoring a model on the test split: metrics, calibration, ROC, transfer gain, mistakes."""
