"""The engine: sequences, the KV block manager, the scheduler, the model runner, LLMEngine and LLM."""
