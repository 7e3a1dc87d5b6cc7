"""backend/nn/llm (Neo): the language-model text encoders."""
