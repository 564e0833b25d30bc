"""cm3leon_lightning."""
