"""Fine-tuning: JSONL data (``data``), the one training loop for every family (``train``)."""
