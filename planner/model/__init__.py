"""Stage 1, model -> bytes: what one replica of a model needs, term by term, for the engine that runs it.

Owns: reading checkpoints' headers (formats/: safetensors, GGUF), the ModelSpec of every tensor (spec/: types, one
load dispatch, a reader per source), the quantization schemes (quant/: the registry, one module per family: which
tensors each replaces and their resident bytes), the terms every engine shares (estimate: ReplicaEstimate, weights,
KV cache, activations), the engines (engines/: the registry, one module per engine: what it allocates, its typed
settings), and training memory (training).

May import: planner.errors, planner.units, and itself. Nothing about clusters, placement or output."""
