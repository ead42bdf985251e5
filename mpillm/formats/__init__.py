"""File formats and the model's description: shards, partitioning, quantization, config, tokenizer."""
