"""Engine flags shared by every command (named as vLLM names them)."""

from __future__ import annotations

import argparse

from llmserve.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
    if model_positional:
        parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                            help="Hugging Face checkpoint folder, Hub id or s3://bucket/prefix (default: the built-in demo "
                                 "model)")
    parser.add_argument("--model", default=None, help="same as the positional MODEL")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder, Hub id or s3://bucket/prefix (default: the model's)")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the model")
    g.add_argument("--tokenizer-revision", default=None, help="Hub revision of the tokenizer")
    g.add_argument("--download-dir", default=None, help="where Hub downloads and the small files of s3:// models go (default: the Hugging Face "
                        "cache; $LLMSERVE_CACHE_DIR/s3 for s3://)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations; auto = bfloat16 on a CPU that multiplies it natively (avx512_bf16 / "
                        "amx_bf16) unless quantised, else float32; on GPU the checkpoint's dtype (bfloat16 for a "
                        "float32 checkpoint)")
    g.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
                   help="int8 (W8A8) or fp8 (weight-only e4m3): quantise a full-precision checkpoint at load; "
                        "awq, gptq, compressed-tensors: a checkpoint's own format, which is read without the flag")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=0, help="seed for requests that do not set their own")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + output); default: the model's")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV-cache entries: auto = the model's dtype; fp8 (= fp8_e4m3), fp8_e5m2 or int8 store one "
                        "byte each with per-layer K and V scales (the checkpoint's, else 1.0 for fp8 and fitted to "
                        "the first batch for int8): more blocks for the same memory")
    g.add_argument("--kv-cache-memory-bytes", default=None,
                   help="KV-cache size as bytes or with a unit (4GiB, 512MB); default 4GiB on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights + activations + KV cache (GPU only)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens in one step (default 2048, or max(2048, --max-model-len) without chunked "
                        "prefill); long prompts are prefilled in chunks of this")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="split long prompts across steps (default on)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of cached prompt prefixes (default on)")
    g.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / prompt_logprobs accepted")
    g.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="CPU: run up to this many decode steps per engine step in compiled code, each "
                        "token fed back (less Python per token; a stream's tokens arrive that many at a time). "
                        "Steps with prefills or with requests that are seeded or penalise, bias, constrain, "
                        "adapt or ask logprobs run one token. Needs the fused CPU decode step (refused at start-up "
                        "otherwise) and no speculative decoding")
    g.add_argument("--stream-interval", type=int, default=1,
                   help="a streamed request gets an output (an SSE event) every this many tokens, its first and "
                        "last at once: less front-end work per token at high concurrency, coarser streaming")
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="GPU only: never replay CUDA graphs (every step runs eagerly)")
    g.add_argument("--max-seq-len-to-capture", type=int, default=8192,
                   help="GPU only: decode steps with a longer context than this run eagerly, not in a CUDA graph")
    g.add_argument("--pooler-config", default=None, metavar="JSON",
                   help='embeddings (/v1/embeddings, LLM.embed), as vLLM\'s flag: {"pooling_type": "LAST" | "MEAN" | '
                        '"CLS", "normalize": true} (default: LAST, L2-normalised)')
    g.add_argument("--structured-outputs-config", default=None, metavar="JSON",
                   help='structured outputs, as vLLM\'s flag: {"backend": "auto" | "guidance" | "llguidance", '
                        '"disable_any_whitespace": false} (llguidance is the only backend)')
    s = parser.add_argument_group("speculative decoding")
    s.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='as vLLM\'s flag: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                        '"prompt_lookup_max": 5}; methods ngram, suffix and draft_model (with "model": PATH); '
                        'default: off')
    s.add_argument("--speculative-model", default=None,
                   help="older form of --speculative-config: a draft model's path, or [ngram] (n-gram prompt lookup)")
    s.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="older form of --speculative-config's num_speculative_tokens")
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true", help="serve PEFT LoRA adapters on the base model")
    lora.add_argument("--max-loras", type=int, default=1, help="most distinct adapters in one step (resident slots)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in CPU memory, least recently used evicted (default: --max-loras)")
    lora.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="dtype of the adapters' weights (auto: the model's)")
    p = parser.add_argument_group("parallelism")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks that split every layer's heads and weights")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="stages that split the layers")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="mixture-of-experts layers distribute their experts over the tensor-parallel ranks "
                        "(default: every rank holds a slice of every expert)")
    p.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "ray"],
                   help="how ranks run: uni (in process; one rank), mp (a process per rank on this machine; the "
                        "default for more than one rank) or ray (across a Ray cluster)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    model = getattr(args, "model_tag", None) or args.model
    return EngineConfig(
        model=model, tokenizer=args.tokenizer, revision=args.revision, tokenizer_revision=args.tokenizer_revision,
        download_dir=args.download_dir, trust_remote_code=args.trust_remote_code, dtype=args.dtype,
        quantization=args.quantization, device=args.device, seed=args.seed, max_model_len=args.max_model_len,
        block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill, enable_prefix_caching=args.enable_prefix_caching,
        max_logprobs=args.max_logprobs, stream_interval=args.stream_interval,
        num_scheduler_steps=args.num_scheduler_steps,
        pooler_config=args.pooler_config,
        num_threads=args.num_threads, enforce_eager=args.enforce_eager,
        max_seq_len_to_capture=args.max_seq_len_to_capture,
        structured_outputs_config=args.structured_outputs_config,
        speculative_config=args.speculative_config, speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        distributed_executor_backend=args.distributed_executor_backend,
        enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras, lora_dtype=args.lora_dtype)
