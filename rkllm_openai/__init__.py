"""OpenAI wire format ⇄ engine: request translation (`schemas`) and event → response/SSE translation (`stream`).

Imports no Home Assistant (stdlib, pydantic, `rkllm_engine` types), so it is tested without it; the integration's
HTTP views (`custom_components/rkllm/http.py`) serve it. Vendored into the release zip like `rkllm_engine`.
"""
