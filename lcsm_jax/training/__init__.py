"""Training the byte-level language model (`experiments/train_lm.py`): the corpus (`corpus`) and
the training loop (`trainer`). Not imported by the inference code."""
