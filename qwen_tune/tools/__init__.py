"""The commands that use a model or data without training: chat, eval, score, preprocess, merge."""
