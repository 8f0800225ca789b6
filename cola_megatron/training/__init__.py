"""Training: the loop (:mod:`.trainer`), a run from config to finish (:mod:`.run`), checkpoints (:mod:`.checkpoint`),
metrics, deterministic micro-batches and process groups (:mod:`.distributed`)."""
