"""On-disk formats: checkpoint readers (safetensors, GGUF, folders) and the bundle."""
