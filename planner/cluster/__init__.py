"""Stage 2, the cluster: nodes and GPUs as the planner sees them (inventory: Cluster, Node, Gpu, and the one place
that probes hardware, returning "no GPU, because ..." rather than raising). GPU types and sizes live in the data
catalog (planner/catalog/gpus.json).

May import: planner.errors, planner.units, and itself."""
