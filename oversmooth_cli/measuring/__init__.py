"""Measuring: the run behind ``oversmooth measure`` (:mod:`.run`), what it reports (:mod:`.summary`), and the
monitor that measures a fixed probe inside any training loop (:mod:`.monitor`)."""
