"""Datasets: readers for on-disk formats, the FFCV writer, and the loaders."""
