"""Write a Llama-shaped checkpoint of random weights, of any size, in safetensors shards, with a byte-level BPE
tokenizer trained on the built-in corpus. Memory stays at one tensor: the shards are streamed to disk.

    python scripts/synthetic_checkpoint.py OUT --gigabytes 8                  # hidden 4096, 8 shards, bfloat16
    python scripts/synthetic_checkpoint.py OUT --layers 8 --hidden 1024 ...   # explicit shape (tests)
    python scripts/synthetic_checkpoint.py OUT --layers 2 --hidden 8192 --heads 64 --kv-heads 8 --intermediate 28672
                                                                              # two Llama-70B-shaped layers

Weights are N(0, 1/fan_in) (RMS-norm weights 1), so activations keep their scale through the layers and the
conversion does real work on every layer; the model predicts nothing useful.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import LlamaConfig

from mfakit.checkpoint import ShardedWriter
from mfakit.loading import DTYPES
from mfakit.outputs import atomic_folder
from mfakit.texts import train_bpe_tokenizer


def llama_config(
    layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, dtype: str, intermediate: int | None = None
) -> LlamaConfig:
    """A Llama config of this shape; the MLP is 4x the hidden size unless `intermediate` says otherwise."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=1,
        dtype=dtype,
    )


def tensor_shapes(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM checkpoint, in the order transformers saves them."""
    d, f, dh = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * dh, config.num_key_value_heads * dh
    shapes = [("model.embed_tokens.weight", (config.vocab_size, d))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    return shapes + [("model.norm.weight", (d,)), ("lm_head.weight", (config.vocab_size, d))]


def checkpoint_bytes(config: LlamaConfig, element: int) -> int:
    return sum(math.prod(s) for _, s in tensor_shapes(config)) * element


def write_synthetic(out: Path, config: LlamaConfig, shards: int, seed: int = 0, overwrite: bool = False) -> Path:
    """Stream the random tensors into `shards` shards of about equal size, then config and tokenizer."""
    element = DTYPES[str(config.dtype).removeprefix("torch.")]
    size = torch.tensor([], dtype=element).element_size()
    largest = max(math.prod(s) for _, s in tensor_shapes(config)) * size
    generator = torch.Generator().manual_seed(seed)
    with atomic_folder(out, overwrite) as tmp:
        # A shard closes once the next tensor would overflow it, so each holds at least total / shards bytes.
        writer = ShardedWriter(tmp, max_shard_bytes=-(-checkpoint_bytes(config, size) // shards) + largest)
        for name, shape in tensor_shapes(config):
            if len(shape) == 1:
                tensor = torch.ones(shape)
            else:
                tensor = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
            writer.add(name, tensor.to(element))
        writer.close()
        writer.finish()
        config.save_pretrained(tmp)
        train_bpe_tokenizer(config.vocab_size).save_pretrained(tmp)
    return out


def layers_for(gigabytes: float, config: LlamaConfig, element: int) -> int:
    """Layers of the config's shape whose checkpoint is about `gigabytes` (the tensors outside the layers left
    out: small at the default vocabulary)."""
    per_layer = checkpoint_bytes(replace_layers(config, 2), element) - checkpoint_bytes(
        replace_layers(config, 1), element
    )
    return max(1, round(gigabytes * 1e9 / per_layer))


def replace_layers(config: LlamaConfig, layers: int) -> LlamaConfig:
    copy = LlamaConfig.from_dict(config.to_dict())
    copy.num_hidden_layers = layers
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--gigabytes", type=float, help="pick the number of layers for about this many GB")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, help="query heads (default: hidden / 128)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: heads / 4)")
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 4 * hidden)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    element = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    if (args.gigabytes is None) == (args.layers is None):
        parser.error("give exactly one of --gigabytes and --layers")
    hidden = args.hidden
    heads = args.heads or max(1, hidden // 128)
    kv_heads = args.kv_heads or max(1, heads // 4)
    config = llama_config(args.layers or 1, hidden, heads, kv_heads, args.vocab, args.dtype, args.intermediate)
    layers = args.layers or layers_for(args.gigabytes, config, element)
    config.num_hidden_layers = layers
    write_synthetic(args.out, config, args.shards, args.seed, args.overwrite)
    size = checkpoint_bytes(config, element)
    print(f"wrote {args.out}: {layers} layers, hidden {hidden}, {heads} heads / {kv_heads} KV, {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
