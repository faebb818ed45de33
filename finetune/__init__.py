"""Fine-tuning stage: continued pre-training on generated documents (``accelerate launch finetune/train.py``)."""
