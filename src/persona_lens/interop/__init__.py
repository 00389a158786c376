"""Formats and protocols shared with other tools: prompt files, llama.cpp control vectors,
HTTP clients for chat LLM APIs."""
