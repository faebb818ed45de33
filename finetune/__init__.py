"""Fine-tuning stage: continued pre-training of a model on the generator's documents.

Launch with ``accelerate launch finetune/train.py --config configs/finetune/<name>.yaml``;
see ``finetune/README.md``.
"""
