"""Synthetic data: LUMIR-layout data sets from the MNI152 template, and pairs made from one real subject."""
