"""The simulation engine: the client runtime (every client message, one client or a stacked
group), the grids that carry messages (in-process, grouped Ray nodes), the components a
config builds (data, model, objective) and simulated faults and device speeds."""
