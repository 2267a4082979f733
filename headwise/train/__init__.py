"""The training wing: the trainer (`trainer`: model, PEFT wrap, Trainer / TRL under accelerate and
DeepSpeed), the data wiring (`data`), the run folder, its lock and resume (`run_dir`), the fused LM
losses (`losses`) and the fused LoRA forward and Liger kernels (`fused_lora`, `fused_ops`)."""
