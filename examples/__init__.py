"""A Flax NNX language model trained with Orth-Dion: model, data, training, checkpoints, comparison."""
