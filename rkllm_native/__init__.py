"""Native boundary: ctypes binding of librkllmrt, its C emulator, and the worker process (stdlib only)."""
