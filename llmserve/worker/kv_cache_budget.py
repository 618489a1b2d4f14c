"""How much memory a CUDA worker leaves its KV cache (vLLM's sizing), and the worst-case step it profiles to
find out (:meth:`llmserve.worker.model_runner.ModelRunner.profile_kv_cache_budget`)."""

from __future__ import annotations


def kv_cache_budget(total_bytes: int, gpu_memory_utilization: float, peak_bytes: int, non_torch_bytes: int) -> int:
    """Bytes left for the KV cache (as vLLM sizes it): the utilisation share of the GPU, less the peak
    PyTorch memory of a profiled worst-case step (weights + activations + logits + sampler) and the
    memory used outside PyTorch's allocator (CUDA context, cuBLAS workspaces, other processes)."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    return int(total_bytes * gpu_memory_utilization) - peak_bytes - non_torch_bytes


def profile_batch(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the worst-case step the KV cache must leave room for: ``max_num_batched_tokens``
    tokens in as few sequences as ``max_model_len`` allows, at most ``max_num_seqs`` of them."""
    if min(max_num_batched_tokens, max_num_seqs, max_model_len) < 1:
        raise ValueError("max_num_batched_tokens, max_num_seqs and max_model_len must be >= 1")
    lengths: list[int] = []
    left = max_num_batched_tokens
    while left > 0 and len(lengths) < max_num_seqs:
        lengths.append(min(left, max_model_len))
        left -= lengths[-1]
    return lengths
