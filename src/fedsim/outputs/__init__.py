"""Where each run goes: its directory (config, metrics, checkpoints, summary), progress, plots."""
