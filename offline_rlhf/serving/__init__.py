"""OpenAI-compatible serving of a checkpoint on the generation engine (`orlhf serve`).

`protocol` (request checks and answer shapes, no torch), `model` (the served checkpoint),
`batcher` (requests queued into shared engine batches; TP followers), `server` (the
Starlette app), `world` (rank 0's broadcasts to its followers). Import from the submodules.
"""
