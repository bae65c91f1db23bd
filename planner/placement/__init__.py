"""Stage 3, placement: which replicas of which model go on which GPU, at which quantization, and why.

- problem: the inputs (QuantOption, ModelDemand), the results (Plan and its parts), byte and Ray-unit arithmetic,
  the search state;
- greedy: the quantization choice and the minimum replicas (best fit, then the exact search within a budget);
- exact: integer programs and column generation (scipy, lazily), for the minimums and an exact fill;
- fill: replicas up to each maximum, CPU and split GPU+CPU replicas;
- explain: why a plan is infeasible or short, with the numbers and the smallest fix;
- packing: ``plan()``, the pipeline over the above (its names stay importable from here);
- capacity: the smallest cluster that holds a deployment.

How the plan then runs on Ray Serve is the next stage, planner/rollout/.

May import: planner.errors, planner.units, planner.model, planner.cluster, and itself."""
