"""Running Janna's backing stores on one machine, from PyPI packages alone."""
