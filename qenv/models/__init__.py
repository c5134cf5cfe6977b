"""Model loading (transformers, llama2.c, built-in) and the layer walker."""
