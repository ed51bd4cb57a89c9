"""Preprocessing of raw T1w scans for inference (``preprocess`` in ``configs/inference.json``)."""
