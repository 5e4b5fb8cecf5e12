"""Metrics: every formula once (:mod:`.formulas`), the registry that names and describes them (:mod:`.registry`), and
the streaming accumulator whose states sum across batches and processes (:mod:`.accumulate`)."""
