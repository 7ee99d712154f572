"""What serving and distillation share to sample: schedulers, the guided sampler, the w embedding, the pipeline."""
