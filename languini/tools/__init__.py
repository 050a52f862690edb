"""The compute tools (throughput, sweep, FLOPs, steps, new-project) and the project commands: the layer above the projects."""
