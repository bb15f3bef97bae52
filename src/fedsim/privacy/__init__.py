"""Differential privacy: client-level (central, local) and record-level (DP-SGD) mechanisms,
with exact accounting (see :mod:`fedsim.privacy.settings` for the ``privacy:`` section)."""
