"""Which attention backend a device gets, and forcing one with LLMSERVE_ATTENTION_BACKEND."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention import backend as backend_module
from llmserve.layers.attention.backend import ATTENTION_BACKEND_ENV, get_attention_backend, select_attention_backend
from llmserve.layers.attention.cpu_backend import CPUAttentionBackend
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.layers.cpu_kernels import cpu_kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)


def test_auto_picks_triton_on_cuda_only(no_override, monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    assert select_attention_backend(CPU) != "triton"
    assert select_attention_backend(CUDA) == "triton"
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    assert select_attention_backend(CUDA) == "torch"


def test_auto_picks_the_compiled_kernel_on_cpu_in_float32_and_bfloat16_when_it_builds(no_override, monkeypatch):
    assert cpu_kernels() is not None, "the test machine has a C compiler"
    assert isinstance(get_attention_backend(CPU, torch.float32), CPUAttentionBackend)
    bf16 = get_attention_backend(CPU, torch.bfloat16)
    assert isinstance(bf16, CPUAttentionBackend) and bf16.dtype == torch.bfloat16
    assert type(get_attention_backend(CPU, torch.float16)) is TorchAttentionBackend
    monkeypatch.setattr(backend_module, "cpu_kernels", lambda: None)
    assert type(get_attention_backend(CPU, torch.float32)) is TorchAttentionBackend


def test_forcing_the_cpu_backend_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "cpu")
    assert select_attention_backend(CPU) == "cpu"
    assert select_attention_backend(CPU, dtype=torch.bfloat16) == "cpu"
    with pytest.raises(RuntimeError, match="float32 or bfloat16 on the CPU"):
        select_attention_backend(CPU, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 on the CPU"):
        select_attention_backend(CUDA)
    monkeypatch.setattr(backend_module, "cpu_kernels", lambda: None)
    with pytest.raises(RuntimeError, match="could not be built"):
        select_attention_backend(CPU)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    assert select_attention_backend(CUDA) == "torch"
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, " Auto ")
    assert select_attention_backend(CUDA) == "triton"
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    assert select_attention_backend(CUDA) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        select_attention_backend(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_attention_backend(CPU) == "triton"
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        select_attention_backend(CUDA)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match="auto, torch, cpu or triton"):
        select_attention_backend(CUDA)


def test_explicit_choice_beats_the_environment(monkeypatch):
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    assert select_attention_backend(CUDA, "torch") == "torch"


def test_torch_backend_cannot_be_graphed():
    backend = TorchAttentionBackend(torch.float32)
    assert not backend.supports_cuda_graphs
    with pytest.raises(NotImplementedError, match="CUDA graphs"):
        backend.graph_decode_metadata(1, 1, 1, CPU)


def test_latent_attention_gets_pytorch_on_cuda_and_refuses_triton(no_override, monkeypatch):
    """The Triton kernels do not implement multi-head latent attention (DeepSeek): auto falls back to PyTorch,
    forcing Triton is refused; the CPU backends run it."""
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    assert select_attention_backend(CUDA, latent_attention=True) == "torch"
    assert select_attention_backend(CPU, latent_attention=True) == select_attention_backend(CPU)
    with pytest.raises(RuntimeError, match="does not implement multi-head latent attention"):
        select_attention_backend(CUDA, "triton", latent_attention=True)
