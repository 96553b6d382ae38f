"""Training an optimized model: fine-tuning with distillation, Lightning, quantization-aware
training."""
