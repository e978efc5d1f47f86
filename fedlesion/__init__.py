"""fedlesion's thin top-level package: the command line and the settings, nothing else."""

__version__ = "0.1.0"
