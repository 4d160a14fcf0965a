"""Models: the Llama-family decoder (llama.py), checkpoint loaders (hf_loader.py, gguf_loader.py, loading.py),
tokenizers (tokenizer.py) and chat templates (chat_template.py)."""
