"""Tests for rkllm; sub-folders are packages so equal test file names in different folders never clash."""
