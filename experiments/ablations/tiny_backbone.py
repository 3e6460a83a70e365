"""Write the tiny backbone of `run_all.sh --tiny`: a 3-layer random Llama with SmolLM2's tokenizer, as a local model
folder. The data pipeline and the RULER tasks need a real tokenizer with a chat template (the byte tokenizer of
flux's `tiny_random` preset has none), and a few random layers make every sweep job run in seconds on a CPU.

    python experiments/ablations/tiny_backbone.py FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_tiny_backbone(folder: Path, layers: int = 3) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flux.backbone import dequantised_gguf_dir, smollm2_gguf_path

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(dequantised_gguf_dir(smollm2_gguf_path()))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_tiny_backbone(Path(sys.argv[1])))
