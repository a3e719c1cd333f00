"""Tools for studies run as Hydra sweeps (``python -m panda.experiments.collect``)."""
