"""gpuplan's serving side, in stages: engines/ (what runs a model in a replica, behind one interface), api/ (the
OpenAI-compatible HTTP API), app/ (the Ray Serve application: builder, ingress, replicas, autoscaling glue), run/
(the process lifecycle of `make run`). Shared values: types (sampling parameters, chunks, model cards, the errors a
backend raises) and trace (request timelines for benchmarks). tests/unit/test_layout.py checks the imports."""
