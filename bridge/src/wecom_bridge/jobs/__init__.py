"""The shared pipeline: typed jobs, routing, store, intake, workers, splitting, pacing."""
