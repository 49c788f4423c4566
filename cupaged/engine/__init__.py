"""The engine: a core that speaks token ids (core.py: scheduler, block manager, model runner, sampling), the fronts
that speak text (output_processor.py; llm_engine.py and llm.py in this process, async_llm.py for asyncio), and the
core in a process of its own (core_client.py), with their messages (protocol.py)."""
