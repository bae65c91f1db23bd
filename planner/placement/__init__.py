"""Stage 3, placement: which replicas of which model go on which GPU, at which quantization, and why (packing:
quantization choice, best-fit / exact placement of the minimums, fill to the maxima, the explanation of infeasible
plans); the plan as Ray Serve deployments and the order Ray's best fit can bring them up in (rollout); the smallest
cluster that holds a deployment (capacity).

May import: planner.errors, planner.units, planner.model, planner.cluster, and itself."""
