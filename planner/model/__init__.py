"""Stage 1, model -> bytes: what one replica of a model needs, term by term, for the engine that runs it.

Owns: reading checkpoints' headers (formats/: safetensors, GGUF), the ModelSpec of every tensor (spec, gguf_spec),
bytes per tensor per quantization scheme (quant), a replica's weights + KV cache + activations + runtime overhead
(memory), what each engine allocates and is given (engines: transformers and vLLM; llamacpp: llama.cpp's buffers
and layer offload; gguf_offload), and training memory (training).

May import: planner.errors, planner.units, and itself. Nothing about clusters, placement or output."""
