"""Shared test setup: never touch the network or a hub; build small data and models locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("OPENAI_API_KEY", None)  # a test that needs a key sets a fake one for 127.0.0.1
