"""THUDM-format checkpoints (ChatGLM3, GLM-4) loaded as transformers-native models, no remote code."""
