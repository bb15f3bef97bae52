"""Gradient coding for straggler mitigation: codes, straggler models and the sequential
schedules of Krishnan, Ebrahimi & Khisti (ICLR 2023). Plain numpy: no federation, no torch."""
