"""Stage 2, the cluster: nodes and GPUs as the planner sees them (inventory: Cluster, Node, Gpu, and the one place
that probes hardware, returning "no GPU, because ..." rather than raising), and which engines the replicas have
(installed: found as `make run` finds them, without importing them). GPU types and sizes live in the data catalog
(planner/catalog/gpus.json).

May import: planner.errors, planner.units, and itself."""
