"""One module per `orlhf` stage: its `main(config)` and the orchestration specific to it."""
