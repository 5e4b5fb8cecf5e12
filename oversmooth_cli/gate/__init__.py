"""The CI gate: reading runs back (:mod:`.runs`), whether two runs are comparable (:mod:`.comparable`), tolerances,
the check and its reports, baselines, and overlays of several runs (:mod:`.compare`)."""
