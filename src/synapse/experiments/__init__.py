"""The experiment program around the library: datasets, models, the training loop, checkpoints, reports.

This package may import torchvision, matplotlib and tqdm (the ``cli`` extra); the library never imports it.
"""
