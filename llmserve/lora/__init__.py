"""Multi-LoRA serving: PEFT adapters on one base model, any mix of them in one batch."""
