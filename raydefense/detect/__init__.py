"""Adversarial-example detectors built on trained models (ER-Detector)."""
