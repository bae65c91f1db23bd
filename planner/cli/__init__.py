"""``gpuplan`` command line: parse arguments, call the planner, print. Exit codes: 0 ok, 2 bad input, 3 infeasible.

Imports stay light (no ray, no torch) so that ``gpuplan --help`` starts in well under a second.
"""

from __future__ import annotations

import argparse
import json
import sys

from planner.errors import GpuplanError, InputError
from planner.model.engines import ENGINE_NAMES
from planner.model.quant import SCHEME_NAMES
from planner.units import parse_bytes


def _positive_int(name):
    def conv(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {v!r}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {n}")
        return n

    return conv


def _size(v: str) -> int:
    try:
        return parse_bytes(v)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpuplan",
        description="Memory-aware planning of LLM replicas on GPUs: exact bytes per replica, and how many fit where.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    e = sub.add_parser("estimate", help="bytes one replica of a model needs (weights, KV cache, activations, runtime)")
    e.add_argument("source", help="local model dir, config.json, .gguf file, or catalog name (see `gpuplan catalog`)")
    e.add_argument("--quant", default=None,
                   help=f"{'|'.join(SCHEME_NAMES)}, or several comma-separated to "
                        "compare (default: the checkpoint's own quantization, else its dtype)")
    e.add_argument("--dtype", default=None, help="dtype of unquantized tensors and compute: bf16|fp16|fp32 "
                                                 "(default: the config's dtype, else bf16)")
    e.add_argument("--max-model-len", type=_positive_int("--max-model-len"), default=None,
                   help="tokens per sequence the KV cache holds (default: min(max_position_embeddings, 4096))")
    e.add_argument("--max-num-seqs", type=_positive_int("--max-num-seqs"), default=1,
                   help="concurrent sequences per replica (default 1)")
    e.add_argument("--max-num-batched-tokens", type=_positive_int("--max-num-batched-tokens"), default=None,
                   help="tokens of one prefill chunk (default: max-model-len)")
    e.add_argument("--kv-dtype", default="auto", help="auto (= compute dtype) | bf16 | fp16 | fp32 | fp8")
    e.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the replica runs (default cuda)")
    e.add_argument("--bits", type=int, default=None, help="awq/gptq bits when estimating a checkpoint (default 4)")
    e.add_argument("--group-size", type=int, default=None, help="awq/gptq group size (default 128; -1 = none)")
    e.add_argument("--mla-latent-cache", action="store_true",
                   help="MLA models: size the compressed latent KV cache (vLLM) instead of transformers' full K/V")
    e.add_argument("--engine", default="auto", choices=["auto", *ENGINE_NAMES],
                   help="the engine whose allocations to size (default auto: the one `gpuplan plan` picks for the "
                        "scheme with the engines found here: llama.cpp for a GGUF file, vLLM where it is installed "
                        "and runs the scheme, transformers otherwise)")
    e.add_argument("--gpu", default=None,
                   help="also predict the replica's speed on this GPU (a name of the GPU catalog, e.g. A100-80GB), or "
                        "`cpu` (this machine's, planner/catalog/cpus.json): TTFT, TPOT, tokens/s "
                        "(planner/model/speed.py, docs/speed-model.md)")
    e.add_argument("--input-tokens", type=_positive_int("--input-tokens"), default=512,
                   help="--gpu: prompt tokens per request (default 512)")
    e.add_argument("--output-tokens", type=_positive_int("--output-tokens"), default=256,
                   help="--gpu: generated tokens per request (default 256)")
    e.add_argument("--batch", type=_positive_int("--batch"), default=None,
                   help="--gpu: sequences decoded together (default --max-num-seqs)")
    e.add_argument("--mode", choices=["infer", "train"], default="infer", help="infer (default) or train")
    e.add_argument("--zero-stage", type=int, default=0, help="--mode train: DeepSpeed ZeRO stage 0-3")
    e.add_argument("--num-gpus", type=_positive_int("--num-gpus"), default=1, help="--mode train: data-parallel GPUs")
    e.add_argument("--micro-batch", type=_positive_int("--micro-batch"), default=1, help="--mode train: sequences per GPU")
    e.add_argument("--json", action="store_true", help="stable JSON instead of a table")

    c = sub.add_parser("catalog", help="list the real model configs shipped with gpuplan")
    c.add_argument("--json", action="store_true")

    g = sub.add_parser("gguf-layers", help="llama.cpp: how many layers of a GGUF file fit in a VRAM budget")
    g.add_argument("file", help=".gguf file")
    g.add_argument("--vram", type=_size, required=True, help="GPU memory budget, e.g. 8GiB")
    g.add_argument("--ctx", type=_positive_int("--ctx"), default=4096, help="context length (default 4096)")
    g.add_argument("--json", action="store_true")

    pr = sub.add_parser("probe", help="what this host's GPUs are, as NVML reports them (or why there are none)")
    pr.add_argument("--json", action="store_true")

    _add_plan_commands(sub)
    return p


def _add_plan_commands(sub) -> None:
    try:
        from planner.cli import plan as cli_plan
    except ImportError:  # planning commands not built in this version
        return
    cli_plan.add_commands(sub)


def cmd_estimate(args) -> int:
    from planner.cluster.installed import installed_engines
    from planner.model.engines import estimate_replica, pick_engine
    from planner.model.quant import resolve_quant
    from planner.output.report import compare_table, estimate_table
    from planner.model.spec import load_spec

    spec = load_spec(args.source)
    if args.mode == "train":
        return _train(spec, args)
    quants = [q.strip() for q in args.quant.split(",")] if args.quant else [None]
    found = installed_engines()
    device = None
    if args.gpu:
        from planner.placement.capacity import CPU_DEVICE, device_speed

        device = device_speed(args.gpu)  # a GPU of the catalog, or `cpu` (planner/catalog/cpus.json)
        if args.gpu.lower() == CPU_DEVICE:
            args.device = "cpu"
        elif args.device == "cpu":
            raise InputError(f"--gpu {args.gpu} predicts the speed on a GPU; drop --device cpu (or use --gpu cpu)")
        if args.max_model_len is None:  # room for the request asked about
            args.max_model_len = args.input_tokens + args.output_tokens
        if args.batch is not None and args.max_num_seqs == 1:
            args.max_num_seqs = args.batch
    speeds = []
    ests, whys = [], []
    for q in quants:
        # the engine `gpuplan plan` would pick for this scheme (not strict: an engine asked for by name is sized
        # even where it is not installed)
        quant = resolve_quant(spec, q, bits=args.bits, group_size=args.group_size)
        engine, why = pick_engine(args.engine, quant.scheme, found, strict=False, asked_by="--engine")
        whys.append(why)
        ests.append(estimate_replica(
            spec, quant=quant, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, kv_dtype=args.kv_dtype, device=args.device,
            mla_latent_cache=args.mla_latent_cache, bits=args.bits, group_size=args.group_size, engine=engine,
        ))
        if device is not None:
            from planner.model.engines import replica_speed

            speeds.append(replica_speed(spec, quant, ests[-1], device, input_tokens=args.input_tokens,
                                        output_tokens=args.output_tokens, batch=args.batch or ests[-1].max_num_seqs,
                                        kv_dtype=args.kv_dtype, mla_latent_cache=args.mla_latent_cache))
    if not args.json:
        for e, why in dict(zip([e.engine for e in ests], whys)).items():
            print(f"engine {e}: {why}" + ("" if args.engine != "auto" else " (--engine picks another)"),
                  file=sys.stderr)
    if args.json:
        rows = [dict(e.to_json(), **({"speed": speeds[i].to_json()} if speeds else {})) for i, e in enumerate(ests)]
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    print(estimate_table(ests[0]) if len(ests) == 1 else compare_table(ests))
    if speeds:
        from planner.output.report import speed_table

        print()
        print(speed_table(speeds))
    return 0


def _train(spec, args) -> int:
    from planner.model import training

    est = training.estimate_from_spec(spec, dtype=args.dtype or "bf16", zero_stage=args.zero_stage,
                                      num_gpus=args.num_gpus, seq_len=args.max_model_len or 2048,
                                      micro_batch=args.micro_batch)
    print(json.dumps(est.to_json(), indent=2) if args.json else training.format_table(est))
    return 0


def cmd_catalog(args) -> int:
    from planner.model.engines import estimate_replica
    from planner.model.spec import catalog_names, load_spec
    from planner.units import format_bytes

    rows = []
    for name in catalog_names():
        spec = load_spec(name)
        rows.append({"name": name, "model_type": spec.model_type, "params": spec.params_total,
                     "quantization": (spec.checkpoint_quant or {}).get("quant_method"),
                     "weights_bytes": estimate_replica(spec, max_model_len=1).weights})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        w = max(len(r["name"]) for r in rows)
        print(f"{'name':{w}}  {'type':12} {'params':>17}  {'weights as shipped':>18}  checkpoint quant")
        for r in rows:
            print(f"{r['name']:{w}}  {r['model_type']:12} {r['params']:>17,}  {format_bytes(r['weights_bytes'], precision=2):>18}"
                  f"  {r['quantization'] or '-'}")
    return 0


def cmd_gguf_layers(args) -> int:
    from planner.model.formats.gguf import read_gguf
    from planner.model.engines.llamacpp_offload import plan_gpu_layers

    res = plan_gpu_layers(read_gguf(args.file), vram_bytes=args.vram, n_ctx=args.ctx)
    print(json.dumps(res.to_json(), indent=2) if args.json else res.describe())
    return 0


def cmd_probe(args) -> int:
    from planner.cluster.inventory import probe_local_gpus
    from planner.units import format_bytes

    res = probe_local_gpus()
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    elif not res.gpus:
        print(res.reason)
    else:
        for g in res.gpus:
            print(f"{g.id}: {g.name} ({g.gpu_type}), {format_bytes(g.total_bytes)} total, "
                  f"{format_bytes(g.free_bytes or 0)} free")
    return 0


COMMANDS = {"estimate": cmd_estimate, "catalog": cmd_catalog, "gguf-layers": cmd_gguf_layers, "probe": cmd_probe}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS.get(args.cmd)
    if handler is None:
        from planner.cli import plan as cli_plan

        handler = cli_plan.COMMANDS[args.cmd]
    try:
        return handler(args)
    except GpuplanError as exc:
        print(f"gpuplan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
