"""Official weights by name: the registry of upstream checkpoints (declared beside each family in
`medjax/models/<family>/sources.py`) and the fetch / verify / convert / cache machinery (`medjax.weights.fetch`).
`python -m converters fetch NAME` and `model.pretrained=NAME` use it; docs/weights.md describes it."""
