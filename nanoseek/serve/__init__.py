"""Talking to a model: an OpenAI-compatible HTTP API with DeepSeek-style reasoning fields (app.py), continuous
batching of concurrent requests on one worker thread (batcher.py), streaming text that never splits a UTF-8
character or a tag (reasoning.py), prompts in the checkpoint's own template (template.py), a terminal chat
(chat.py) and a static web page (static/index.html). Uses nanoseek.model and nanoseek.train.load only."""
