"""Tests of the OpenAI-compatible API and /health, on the real engine, worker and emulator."""
