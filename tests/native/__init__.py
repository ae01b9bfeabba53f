"""Tests of the native boundary: ctypes binding, version detection and the emulator."""
