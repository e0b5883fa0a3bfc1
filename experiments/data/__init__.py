"""Entry points that write data sets to disk (`python -m experiments.data.nuclei ...`)."""
