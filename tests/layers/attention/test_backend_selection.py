"""Which attention backend a device gets, and forcing one with LLMSERVE_ATTENTION_BACKEND."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention import backend as backend_module
from llmserve.layers.attention.backend import ATTENTION_BACKEND_ENV, get_attention_backend, select_attention_backend
from llmserve.layers.attention.torch_backend import TorchAttentionBackend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)


def test_auto_picks_triton_on_cuda_only(no_override, monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    assert select_attention_backend(CPU) == "torch"
    assert select_attention_backend(CUDA) == "triton"
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    assert select_attention_backend(CUDA) == "torch"
    assert isinstance(get_attention_backend(CPU, torch.float32), TorchAttentionBackend)


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
    with pytest.raises(ValueError, match="auto, torch or triton"):
        select_attention_backend(CUDA)


def test_explicit_choice_beats_the_environment(monkeypatch):
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    assert select_attention_backend(CUDA, "torch") == "torch"


def test_torch_backend_cannot_be_graphed():
    backend = TorchAttentionBackend(torch.float32)
    assert not backend.supports_cuda_graphs
    with pytest.raises(NotImplementedError, match="CUDA graphs"):
        backend.graph_decode_metadata(1, 1, 1, CPU)
