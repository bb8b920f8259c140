"""FAM fine-tuning (FAM-SPEC.md "Training"; docs/training.md): the differentiable all-at-once model (sequence), LoRA
and adapter export (lora), PassKey data (passkey) and training batches (data), the training loop with Random State
Passing (trainer), engine-based evaluation (evaluate), the miniature PassKey experiment (miniature), and the
`famserve train` / `famserve eval` commands (cli)."""
