"""The text side of a model: its tokenizer (Hugging Face or GGUF), the chat template, tools in the prompt and tool
calls parsed out of (or forced into) the answer, and the reasoning a thinking model writes before it."""
