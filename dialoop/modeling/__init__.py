"""Loading causal LMs and tokenizers, chat templates, generation, reward and value heads."""
