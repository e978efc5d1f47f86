"""fedlesion's thin top-level package: the command line and the settings, nothing else."""
